import { Webhook } from 'standardwebhooks';
import { tenantSigningSecret } from '../core/webhooks.js';

/**
 * Standard Webhooks signatures (the `standardwebhooks` package, the only module that imports
 * it): HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>" with the secret, sent as
 * "v1,<base64>". Receivers verify with the same package and their tenant's secret (README "Webhooks").
 */

/**
 * Signs as a tenant: with its secret, derived from the deployment's (src/core/webhooks.ts
 * tenantSigningSecret), so each tenant's receivers trust only messages meant for that tenant.
 */
export function createSigner(master: string): (tenantId: string, msgId: string, timestamp: Date, body: string) => string {
  const byTenant = new Map<string, Webhook>();
  return (tenantId, msgId, timestamp, body) => {
    let wh = byTenant.get(tenantId);
    if (!wh) {
      wh = new Webhook(tenantSigningSecret(master, tenantId));
      byTenant.set(tenantId, wh);
    }
    return wh.sign(msgId, timestamp, body);
  };
}
