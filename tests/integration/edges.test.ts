/**
 * The API's edges with real `t2i api` processes: CORS only for the origins in CORS_ORIGINS, the
 * client address behind proxies only as far as TRUST_PROXY says (what the failed-authentication
 * limit counts by), /metrics only with its token, and AUTH=off only on a loopback address.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { createTestKey } from '../support/accounts.js';
import { configEnv, startApiProcess, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

let config: Config;
const procs: ServiceProcess[] = [];

beforeAll(async () => {
  // No worker runs here: the test engine's model is known, so jobs are taken and wait.
  config = await isolatedConfig({ KNOWN_MODELS: 'test-engine' });
});

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
});

async function api(overrides: Record<string, string>, name = 'api'): Promise<string> {
  const started = await startApiProcess(config, overrides, name);
  procs.push(started.proc);
  return started.url;
}

describe('CORS', () => {
  it('is off unless CORS_ORIGINS is set; then only its origins get CORS headers, preflights included', async () => {
    const off = await api({}, 'cors-off');
    const preflightOff = await fetch(`${off}/generated-images`, {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' },
    });
    expect(preflightOff.headers.get('access-control-allow-origin')).toBeNull();

    const url = await api({ CORS_ORIGINS: 'https://app.example.com' }, 'cors-on');
    const { auth } = await createTestKey(config.DATABASE_URL);
    const preflight = await fetch(`${url}/generated-images`, {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type' },
    });
    expect(preflight.status).toBe(204);
    expect(preflight.headers.get('access-control-allow-origin')).toBe('https://app.example.com');
    expect(preflight.headers.get('access-control-allow-headers')).toMatch(/authorization/);
    expect(preflight.headers.get('access-control-allow-credentials')).toBeNull();

    const allowed = await fetch(`${url}/usage`, { headers: { ...auth, origin: 'https://app.example.com' } });
    expect(allowed.status).toBe(200);
    expect(allowed.headers.get('access-control-allow-origin')).toBe('https://app.example.com');
    expect(allowed.headers.get('access-control-expose-headers')).toMatch(/ratelimit-remaining/);

    for (const origin of ['https://evil.example.com', 'http://app.example.com', 'https://app.example.com.evil.net']) {
      const other = await fetch(`${url}/usage`, { headers: { ...auth, origin } });
      expect(other.headers.get('access-control-allow-origin'), origin).toBeNull();
      const pre = await fetch(`${url}/generated-images`, { method: 'OPTIONS', headers: { origin, 'access-control-request-method': 'POST' } });
      expect(pre.headers.get('access-control-allow-origin'), origin).toBeNull();
    }
  });
});

describe('TRUST_PROXY', () => {
  const bad = (xff: string) => ({ authorization: 'Bearer t2i_00000000_' + '0'.repeat(64), 'x-forwarded-for': xff });
  const statuses = async (url: string, xff: string, n: number) => {
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push((await fetch(`${url}/usage`, { headers: bad(xff) })).status);
    return out;
  };

  it('counts failed authentications by the forwarded address only when the proxy is trusted', async () => {
    // The test connects from 127.0.0.1: as a trusted proxy, its X-Forwarded-For names the client.
    const trusted = await api({ TRUST_PROXY: '127.0.0.1', AUTH_FAILURE_LIMIT: '3', QUEUE_NAME: `${config.QUEUE_NAME}-trusted` }, 'trusted');
    expect(await statuses(trusted, '203.0.113.7', 4)).toEqual([401, 401, 401, 429]);
    // Another client behind the same proxy has its own count.
    expect(await statuses(trusted, '203.0.113.8', 1)).toEqual([401]);

    // Not trusted (the default): X-Forwarded-For is ignored, so clients cannot pick a new address per guess.
    const untrusted = await api({ AUTH_FAILURE_LIMIT: '3', QUEUE_NAME: `${config.QUEUE_NAME}-untrusted` }, 'untrusted');
    expect([...(await statuses(untrusted, '198.51.100.1', 2)), ...(await statuses(untrusted, '198.51.100.2', 2))]).toEqual([401, 401, 401, 429]);
  });
});

describe('/metrics on the API', () => {
  it('is not served without METRICS_TOKEN, and needs the token when set', async () => {
    const none = await api({}, 'no-token');
    expect((await fetch(`${none}/metrics`)).status).toBe(404);
    const token = 'a-metrics-token-for-edges';
    const withToken = await api({ METRICS_TOKEN: token }, 'token');
    expect((await fetch(`${withToken}/metrics`)).status).toBe(401);
    expect((await fetch(`${withToken}/metrics`, { headers: { authorization: 'Bearer a-wrong-token-for-edgesx' } })).status).toBe(401);
    const ok = await fetch(`${withToken}/metrics`, { headers: { authorization: `Bearer ${token}` } });
    expect(ok.status).toBe(200);
    expect(await ok.text()).toContain('http_requests_total');
  });
});

describe('AUTH=off', () => {
  it('refuses to start on an address other machines can reach', async () => {
    const run = promisify(execFile);
    const err = await run(process.execPath, [path.resolve('bin/t2i.js'), 'api'], { env: configEnv(config, { AUTH: 'off', HOST: '0.0.0.0', PORT: '0' }) }).then(
      () => undefined,
      (e: unknown) => e as { code: number; stderr: string },
    );
    expect(err?.code).toBe(1);
    expect(err?.stderr).toMatch(/AUTH: "off" is only allowed when HOST is a loopback address/);
  });

  it('on loopback, serves everyone as the tenant "anonymous", still scoped and limited', async () => {
    const url = await api({ AUTH: 'off' }, 'auth-off');
    const created = await fetch(`${url}/generated-images`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'open house' }),
    });
    expect(created.status).toBe(201);
    const usage = (await (await fetch(`${url}/usage`)).json()) as { tenant: string; jobs_today: number };
    expect(usage).toMatchObject({ tenant: 'anonymous', jobs_today: 1 });
    // A keyed tenant's jobs are not the anonymous tenant's.
    const { auth } = await createTestKey(config.DATABASE_URL);
    const keyed = await api({}, 'keyed');
    const mine = (await (await fetch(`${keyed}/generated-images`, { headers: auth })).json()) as { items: unknown[] };
    expect(mine.items).toEqual([]);
  });
});
