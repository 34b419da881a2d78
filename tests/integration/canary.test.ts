/**
 * Canary secrets (issue 11, test 2). An API key and a prompt marked as canaries go through the
 * whole flow against real API and worker processes (logging at info, as in production, and
 * reporting to a local Sentry ingest): a job that succeeds, one that fails in the engine with an
 * error quoting its prompt, bad requests that carry the prompt and the key in the wrong places,
 * a cancel, a delete, a revocation. Afterwards neither canary appears in any log line, Sentry
 * event, Redis key or value, metric or error body; the prompt appears only in answers to its
 * owner (its job, and errors quoting what the owner itself sent).
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { Config } from '../../src/config.js';
import { createTestKey, revokeTestKey, type TestKey } from '../support/accounts.js';
import { startApiProcess, startWorkerProcess, type ServiceProcess } from '../support/processes.js';
import { startSentryIngest, type SentryIngest } from '../support/sentry-ingest.js';
import { isolatedConfig } from '../support/system.js';

const PROMPT = `canary prompt ${randomUUID()}`;
const METRICS_TOKEN = `metrics-${randomUUID()}`;

let config: Config;
let db: Db;
let sentry: SentryIngest;
let url: string;
let api: ServiceProcess;
let worker: ServiceProcess;
let canary: TestKey;
let secret: string;
/** Every answer the API gave in the flow, with whether it was the owner's own success. */
const answers: Array<{ what: string; status: number; body: string; headers: string; toOwner: boolean }> = [];
/** /metrics of the API and the worker, scraped right after the flow. */
const scraped: Record<string, string> = {};

async function call(
  what: string,
  method: string,
  path: string,
  opts: { headers?: Record<string, string>; body?: string } = {},
): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${url}${path}`, {
    method,
    headers: { ...(opts.body === undefined ? {} : { 'content-type': 'application/json' }), ...opts.headers },
    ...(opts.body === undefined ? {} : { body: opts.body }),
  });
  const body = await res.text();
  // An answer to the owner: the request was authenticated with its key (before the revocation).
  const toOwner = opts.headers?.authorization === canary.auth.authorization && res.status !== 401;
  answers.push({ what, status: res.status, body, headers: JSON.stringify([...res.headers]), toOwner });
  return { status: res.status, json: body ? (JSON.parse(body) as Record<string, unknown>) : {} };
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const finished = (id: string) =>
  until(`job ${id} to end`, 30_000, async () => {
    const r = await db.generatedImage.findUnique({ where: { id } });
    return r && ['succeeded', 'failed', 'canceled'].includes(r.status) ? r : undefined;
  });

beforeAll(async () => {
  sentry = await startSentryIngest();
  config = await isolatedConfig({ SENTRY_DSN: sentry.dsn, METRICS_TOKEN, JOB_ATTEMPTS: '2', JOB_BACKOFF_MS: '100' });
  db = createPrismaClient(config.DATABASE_URL);
  canary = await createTestKey(config.DATABASE_URL, 'canary-co');
  secret = canary.key.slice(`t2i_${canary.prefix}_`.length);
  ({ proc: api, url } = await startApiProcess(config));
  worker = await startWorkerProcess(config, 'canary-worker', 20);

  const auth = canary.auth;
  // A job that succeeds, seen every way its owner can see it.
  const ok = await call('create', 'POST', '/generated-images', {
    headers: auth,
    body: JSON.stringify({ prompt: PROMPT, negative_prompt: PROMPT, num_steps: 3, width: 64, height: 64 }),
  });
  expect(ok.status).toBe(201);
  const okId = ok.json.id as string;
  expect((await finished(okId)).status).toBe('succeeded');
  await call('get', 'GET', `/generated-images/${okId}`, { headers: auth });
  await call('list', 'GET', '/generated-images', { headers: auth });
  const link = await call('url', 'GET', `/generated-images/${okId}/url`, { headers: auth });
  expect((await fetch(link.json.url as string)).status).toBe(200);
  await call('usage', 'GET', '/usage', { headers: auth });

  // A job whose engine fails with an error quoting the prompt, retried once, then failed.
  const bad = await call('create failing', 'POST', '/generated-images', {
    headers: auth,
    body: JSON.stringify({ prompt: `${PROMPT} [test:fail]`, num_steps: 2, width: 64, height: 64 }),
  });
  expect((await finished(bad.json.id as string)).status).toBe('failed');
  await call('get failed', 'GET', `/generated-images/${bad.json.id as string}`, { headers: auth });
  await call('url of failed', 'GET', `/generated-images/${bad.json.id as string}/url`, { headers: auth });

  // Bad requests carrying the prompt, and the key where it does not belong.
  await call('invalid body', 'POST', '/generated-images', { headers: auth, body: JSON.stringify({ prompt: PROMPT, num_steps: 0, [canary.key]: PROMPT }) });
  await call('control character', 'POST', '/generated-images', { headers: auth, body: JSON.stringify({ prompt: `${PROMPT}\u0007` }) });
  await call('too long', 'POST', '/generated-images', { headers: auth, body: JSON.stringify({ prompt: PROMPT.repeat(200) }) });
  await call('bad json', 'POST', '/generated-images', { headers: auth, body: `{"prompt": "${PROMPT}",` });
  await call('key in the query', 'GET', `/generated-images?api_key=${canary.key}`, { headers: auth });
  await call('key in the path', 'GET', `/generated-images/${canary.key}`, { headers: auth });
  await call('key as request id', 'GET', '/usage', { headers: { ...auth, 'x-request-id': canary.key } });
  await call('key without Bearer', 'GET', '/usage', { headers: { authorization: canary.key } });
  await call('key as Basic', 'GET', '/usage', { headers: { authorization: `Basic ${canary.key}` } });
  const typo = `${canary.key.slice(0, -1)}${canary.key.endsWith('0') ? '1' : '0'}`;
  await call('key with a typo', 'GET', '/usage', { headers: { authorization: `Bearer ${typo}` } });

  // A canceled job and a deleted one.
  const slow = await call('create slow', 'POST', '/generated-images', {
    headers: auth,
    body: JSON.stringify({ prompt: PROMPT, num_steps: 50, width: 64, height: 64 }),
  });
  await call('cancel', 'POST', `/generated-images/${slow.json.id as string}/cancel`, { headers: auth });
  await finished(slow.json.id as string);
  await call('delete', 'DELETE', `/generated-images/${okId}`, { headers: auth });
  await call('get deleted', 'GET', `/generated-images/${okId}`, { headers: auth });

  // The key revoked, then used.
  await revokeTestKey(config.DATABASE_URL, canary.prefix);
  await call('revoked', 'GET', '/usage', { headers: auth });

  // What the processes' metrics say after all that.
  const scrape = { headers: { authorization: `Bearer ${METRICS_TOKEN}` } };
  scraped.api = await (await fetch(`${url}/metrics`, scrape)).text();
  const metricsUrl = worker.lines.find((l) => l.msg === 'worker ready')!.metricsUrl as string;
  scraped.worker = await (await fetch(`${metricsUrl}/metrics`, scrape)).text();
  // Let the processes write their last lines and reports.
  await new Promise((r) => setTimeout(r, 1_000));
}, 180_000);

afterAll(async () => {
  await Promise.allSettled([api?.stop(), worker?.stop()]);
  await sentry?.close();
  await db?.$disconnect();
});

/** Where each canary must never be. */
function expectNoCanary(where: string, text: string, opts: { prompt: boolean } = { prompt: true }): void {
  expect(text, `${where}: the key's secret`).not.toContain(secret);
  expect(text, `${where}: the key's secret, in part`).not.toContain(secret.slice(0, 24));
  if (opts.prompt) expect(text, `${where}: the prompt`).not.toContain(PROMPT);
}

describe('canary key and prompt', () => {
  it('the flow ran as described (so the checks below look at real traffic)', () => {
    const by = (what: string) => answers.find((a) => a.what === what)!;
    expect(by('get').status).toBe(200);
    expect(by('url of failed').status).toBe(400);
    for (const w of ['invalid body', 'control character', 'too long', 'bad json', 'key in the query']) expect(by(w).status, w).toBe(400);
    expect(by('key in the path').status).toBe(404);
    for (const w of ['key without Bearer', 'key as Basic', 'key with a typo', 'revoked']) expect(by(w).status, w).toBe(401);
    expect(by('get deleted').status).toBe(404);
    // The failing job was reported, twice (retried, then final).
    expect(sentry.events().length).toBeGreaterThanOrEqual(2);
  });

  it('appears in no log line of the API or the worker', async () => {
    await Promise.all([api.stop(), worker.stop()]);
    for (const p of [api, worker]) {
      const text = [...p.lines.map((l) => JSON.stringify(l)), ...p.stderr].join('\n');
      expect(p.lines.length, p.name).toBeGreaterThan(10);
      expectNoCanary(`${p.name} log`, text);
    }
    // The key is named by its prefix instead.
    expect(api.lines.some((l) => l.keyPrefix === canary.prefix)).toBe(true);
  });

  it('appears in no Sentry event', () => {
    expect(sentry.raw.length).toBeGreaterThan(0);
    for (const e of sentry.raw) expectNoCanary('sentry', e);
  });

  it('appears in no Redis key or value', async () => {
    const redis = new Redis(config.REDIS_URL);
    try {
      const keys: string[] = [];
      let cursor = '0';
      do {
        const [next, batch] = await redis.scan(cursor, 'COUNT', 1000);
        cursor = next;
        keys.push(...batch);
      } while (cursor !== '0');
      // Our model's queue's jobs and our rate-limit counters are among them.
      expect(keys.some((k) => k.startsWith(`bull:${config.QUEUE_NAME}.test-engine:`))).toBe(true);
      expect(keys.some((k) => k.startsWith(`t2i:${config.QUEUE_NAME}:rate:`))).toBe(true);
      let dump = keys.join('\n');
      for (const k of keys) {
        const type = await redis.type(k);
        const value =
          type === 'string'
            ? await redis.get(k)
            : type === 'hash'
              ? await redis.hgetall(k)
              : type === 'list'
                ? await redis.lrange(k, 0, -1)
                : type === 'set'
                  ? await redis.smembers(k)
                  : type === 'zset'
                    ? await redis.zrange(k, 0, -1, 'WITHSCORES')
                    : type === 'stream'
                      ? await redis.xrange(k, '-', '+')
                      : null;
        dump += `\n${JSON.stringify(value)}`;
      }
      expectNoCanary('redis', dump);
    } finally {
      redis.disconnect();
    }
  });

  it('appears in no metric of the API or the worker', () => {
    // Counted by route pattern and outcome, never by path, key or text.
    expect(scraped.api).toMatch(/http_requests_total\{method="GET",route="\/generated-images\/:id",status_class="4xx"\} [1-9]/);
    expect(scraped.worker).toMatch(/t2i_jobs_finished_total\{outcome="failed",model="test-engine"\} 1/);
    expectNoCanary('api metrics', scraped.api!);
    expectNoCanary('worker metrics', scraped.worker!);
  });

  it("appears in no error body or header; the prompt only in answers to its owner, the key's secret in none", () => {
    expect(answers.length).toBeGreaterThan(15);
    for (const a of answers) {
      expectNoCanary(`answer to "${a.what}" (headers)`, a.headers);
      expectNoCanary(`answer to "${a.what}"`, a.body, { prompt: !a.toOwner });
    }
    expect(answers.filter((a) => a.toOwner && a.status < 300 && a.body.includes(PROMPT)).length).toBeGreaterThan(0);
    // The key a client pasted where it does not belong comes back with its secret blanked.
    expect(answers.find((a) => a.what === 'key in the path')!.body).toContain(`t2i_${canary.prefix}_[redacted]`);
  });
});
