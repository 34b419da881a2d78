/**
 * Per-key rate limits across API instances (issue 11, test 3): two `t2i api` processes share
 * one Redis; a burst from one key, spread over both, is allowed exactly RATE_LIMIT_MAX requests
 * in the window in total (not per process), and every refusal is a 429 problem+json with
 * Retry-After and the standard RateLimit fields. Another key is not affected; after the window
 * the key is served again. The figures are computed from the answers and printed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { createTestKey, type TestKey } from '../support/accounts.js';
import { startApiProcess, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

const LIMIT = 40;
const WINDOW_S = 8;
const SENT = 3 * LIMIT;
const CONCURRENCY = 8;

let config: Config;
const procs: ServiceProcess[] = [];
let urls: string[];
let key: TestKey;
let second: TestKey;

beforeAll(async () => {
  config = await isolatedConfig({ RATE_LIMIT_MAX: String(LIMIT), RATE_LIMIT_WINDOW_MS: String(WINDOW_S * 1000) });
  key = await createTestKey(config.DATABASE_URL, 'busy-co');
  second = await createTestKey(config.DATABASE_URL, 'busy-co');
  const apis = await Promise.all([startApiProcess(config, {}, 'api-a'), startApiProcess(config, {}, 'api-b')]);
  procs.push(...apis.map((a) => a.proc));
  urls = apis.map((a) => a.url);
}, 60_000);

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
});

interface Hit {
  instance: number;
  status: number;
  headers: Headers;
  body: string;
}

async function burst(n: number, auth: Record<string, string>): Promise<Hit[]> {
  const hits: Hit[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < n) {
        const i = next++;
        const instance = i % 2;
        const res = await fetch(`${urls[instance]}/usage`, { headers: auth });
        hits.push({ instance, status: res.status, headers: res.headers, body: await res.text() });
      }
    }),
  );
  return hits;
}

describe('rate limit per key, held across two API instances', () => {
  it(`allows exactly ${LIMIT} requests per ${WINDOW_S} s in total, refuses the rest with correct 429s, and serves again after the window`, async () => {
    // Warm both processes up (connections, JIT) with the other key, so the burst is quick.
    await Promise.all(urls.flatMap((u) => Array.from({ length: 4 }, () => fetch(`${u}/usage`, { headers: second.auth }).then((r) => r.text()))));
    const t0 = Date.now();
    const hits = await burst(SENT, key.auth);
    const burstMs = Date.now() - t0;
    // The figure means something only if the whole burst fell in one window.
    expect(burstMs).toBeLessThan(WINDOW_S * 1000 * 0.8);

    const ok = hits.filter((h) => h.status === 200);
    const refused = hits.filter((h) => h.status === 429);
    expect(ok.length + refused.length, 'only 200s and 429s').toBe(SENT);
    const perInstance = [0, 1].map((i) => ok.filter((h) => h.instance === i).length);
    // Both instances served some, and the total is the limit: one counter, not one per process.
    expect(perInstance[0]).toBeGreaterThan(0);
    expect(perInstance[1]).toBeGreaterThan(0);
    expect(ok.length).toBe(LIMIT);

    // Each allowed request saw the shared counter: remaining took every value from LIMIT-1 down to 0 once.
    const remaining = ok.map((h) => Number(h.headers.get('ratelimit-remaining'))).sort((a, b) => a - b);
    expect(remaining).toEqual(Array.from({ length: LIMIT }, (_, i) => i));
    for (const h of ok) {
      expect(h.headers.get('ratelimit-limit')).toBe(String(LIMIT));
      expect(h.headers.get('ratelimit-policy')).toBe(`${LIMIT};w=${WINDOW_S}`);
      expect(Number(h.headers.get('ratelimit-reset'))).toBeGreaterThan(0);
      expect(Number(h.headers.get('ratelimit-reset'))).toBeLessThanOrEqual(WINDOW_S);
    }
    for (const h of refused) {
      expect(h.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      const body = JSON.parse(h.body) as { status: number; title: string; detail: string };
      expect(body).toMatchObject({ status: 429, title: 'Too Many Requests' });
      expect(body.detail).toContain(`more than ${LIMIT} requests in ${WINDOW_S} s`);
      const retryAfter = Number(h.headers.get('retry-after'));
      expect(Number.isInteger(retryAfter)).toBe(true);
      expect(retryAfter).toBeGreaterThan(0);
      expect(retryAfter).toBeLessThanOrEqual(WINDOW_S);
      expect(h.headers.get('ratelimit-limit')).toBe(String(LIMIT));
      expect(h.headers.get('ratelimit-remaining')).toBe('0');
      expect(h.headers.get('ratelimit-reset')).toBe(String(retryAfter));
      expect(h.headers.get('ratelimit-policy')).toBe(`${LIMIT};w=${WINDOW_S}`);
    }

    // The limit is the key's: another key of the same tenant is served.
    expect((await fetch(`${urls[1]}/usage`, { headers: second.auth })).status).toBe(200);

    // After Retry-After, the key is served again, on either instance.
    const wait = Math.max(...refused.map((h) => Number(h.headers.get('retry-after'))));
    await new Promise((r) => setTimeout(r, wait * 1000 + 200));
    const after = await Promise.all(urls.map((u) => fetch(`${u}/usage`, { headers: key.auth })));
    expect(after.map((r) => r.status)).toEqual([200, 200]);
    const resetS = (Date.now() - t0) / 1000;

    const figures = {
      limit: LIMIT,
      windowS: WINDOW_S,
      sent: SENT,
      acceptedPerInstance: perInstance,
      acceptedTotal: ok.length,
      accuracy: ok.length / LIMIT,
      refused429: refused.length,
      burstMs,
      servedAgainAfterS: Math.round(resetS * 10) / 10,
    };
    console.log(`rate limit across two API instances:\n${JSON.stringify(figures, null, 2)}`);
  });
});
