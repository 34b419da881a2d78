import { Webhook } from 'standardwebhooks';
import { describe, expect, it } from 'vitest';
import { tenantSigningSecret } from '../../src/core/webhooks.js';

/** Per-tenant webhook signing secrets, derived from the deployment's master secret. */

const MASTER = `whsec_${Buffer.alloc(32, 7).toString('base64')}`;

describe('tenantSigningSecret', () => {
  it('is the same for a tenant every time, different between tenants and masters, and never the master', () => {
    const a = tenantSigningSecret(MASTER, 'tenant-a');
    expect(tenantSigningSecret(MASTER, 'tenant-a')).toBe(a);
    expect(tenantSigningSecret(MASTER, 'tenant-b')).not.toBe(a);
    expect(tenantSigningSecret(`whsec_${Buffer.alloc(32, 8).toString('base64')}`, 'tenant-a')).not.toBe(a);
    expect(a).not.toContain(MASTER.slice(6));
    expect(a).toMatch(/^whsec_[A-Za-z0-9+/]{43}=$/);
  });

  it('signs messages the standardwebhooks package verifies with that secret only', () => {
    const a = tenantSigningSecret(MASTER, 'tenant-a');
    const b = tenantSigningSecret(MASTER, 'tenant-b');
    const body = JSON.stringify({ type: 'image.succeeded', data: { id: 'x' } });
    const at = new Date();
    const headers = {
      'webhook-id': 'msg_1',
      'webhook-timestamp': String(Math.floor(at.getTime() / 1000)),
      'webhook-signature': new Webhook(a).sign('msg_1', at, body),
    };
    expect(new Webhook(a).verify(body, headers)).toEqual(JSON.parse(body));
    expect(() => new Webhook(b).verify(body, headers)).toThrow();
  });
});
