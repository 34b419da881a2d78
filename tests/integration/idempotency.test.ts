/**
 * Idempotent submits against two real `t2i api` processes on real Postgres and Redis: replays
 * give back the original job, another body under the same key gets 422, and concurrent
 * duplicates (spread over both instances) create exactly one job, as counted in the database.
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { freePort } from '../../src/dev/services.js';
import { configEnv, spawnService, type ServiceProcess } from '../support/processes.js';
import { checkedFetch, responseChecker, type ResponseChecker } from '../support/openapi.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

let config: Config;
const procs: ServiceProcess[] = [];
const apis: string[] = [];
let db: pg.Client;
/** Every answer is checked against the API's OpenAPI document. */
let checker: ResponseChecker;
let cfetch: typeof fetch;
let auth: Record<string, string>;
let otherAuth: Record<string, string>;

beforeAll(async () => {
  // No worker runs here: the test engine's model is known, so jobs are taken and wait.
  config = await isolatedConfig({ KNOWN_MODELS: 'test-engine' });
  for (let i = 0; i < 2; i++) {
    const port = await freePort();
    procs.push(spawnService(`api-${i}`, 'api', configEnv(config, { PORT: String(port), LOG_LEVEL: 'info' })));
    apis.push(`http://127.0.0.1:${port}`);
  }
  await Promise.all(procs.map((p) => p.waitForLine((l) => l.msg === 'api listening')));
  checker = responseChecker(await (await fetch(`${apis[0]!}/openapi.json`)).json());
  cfetch = checkedFetch(checker);
  auth = (await createTestKey(config.DATABASE_URL, 'idem-co')).auth;
  otherAuth = (await createTestKey(config.DATABASE_URL, 'other-co')).auth;
  db = new pg.Client({ connectionString: config.DATABASE_URL });
  await db.connect();
});

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.end();
});

function post(api: string, body: unknown, key?: string, as: Record<string, string> = auth) {
  return cfetch(`${api}/generated-images`, {
    method: 'POST',
    headers: { ...as, 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }) },
    body: JSON.stringify(body),
  });
}

async function jobsWithPrompt(prompt: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM generated_images WHERE prompt = $1', [prompt]);
  return rows[0]!.n;
}

describe('Idempotency-Key on POST /generated-images', () => {
  it('replays: the same key and body give back the original job and response', async () => {
    const key = randomUUID();
    const body = { prompt: `replay ${key}`, num_steps: 10, width: 64, height: 64 };
    const first = await post(apis[0]!, body, key);
    expect(first.status).toBe(201);
    const original = (await first.json()) as { id: string; seed: number; created_at: string };
    expect(first.headers.get('idempotent-replayed')).toBeNull();

    // Through the other instance, with the keys in another order: the same request.
    const again = await post(apis[1]!, { height: 64, width: 64, num_steps: 10, prompt: body.prompt }, key);
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(again.headers.get('location')).toBe(first.headers.get('location'));
    const replayed = (await again.json()) as typeof original;
    // The seed was drawn at random by the first request: a new job would have drawn another.
    expect(replayed).toMatchObject({ id: original.id, seed: original.seed, created_at: original.created_at });
    expect(await jobsWithPrompt(body.prompt)).toBe(1);

    // Without a key, the same body is a new job.
    const fresh = await post(apis[0]!, body);
    expect(((await fresh.json()) as { id: string }).id).not.toBe(original.id);
    expect(await jobsWithPrompt(body.prompt)).toBe(2);
  });

  it('conflict: the same key with another body gets 422 problem+json, and creates nothing', async () => {
    const key = randomUUID();
    const prompt = `conflict ${key}`;
    expect((await post(apis[0]!, { prompt, num_steps: 10 }, key)).status).toBe(201);
    const res = await post(apis[1]!, { prompt, num_steps: 11 }, key);
    expect(res.status).toBe(422);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(await res.json()).toMatchObject({ status: 422, title: 'Idempotency key reused' });
    expect(await jobsWithPrompt(prompt)).toBe(1);
  });

  it('20 concurrent duplicates over two instances create exactly one job', async () => {
    const key = randomUUID();
    const body = { prompt: `concurrent ${key}`, num_steps: 10, width: 64, height: 64 };
    const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => post(apis[i % 2]!, body, key)));
    expect(answers.map((r) => r.status)).toEqual(Array<number>(20).fill(201));
    const ids = new Set(await Promise.all(answers.map(async (r) => ((await r.json()) as { id: string }).id)));
    expect(ids.size).toBe(1);
    expect(answers.filter((r) => r.headers.get('idempotent-replayed') === null)).toHaveLength(1);
    expect(await jobsWithPrompt(body.prompt)).toBe(1);
    // And one queue entry: the job runs once.
    const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM idempotency_keys WHERE key = $1', [key]);
    expect(rows[0]!.n).toBe(1);
  });

  it('a failed request does not use up its key; a malformed key is a 400 naming the header', async () => {
    const key = randomUUID();
    const bad = await post(apis[0]!, { prompt: '', num_steps: 10 }, key);
    expect(bad.status).toBe(400);
    const good = await post(apis[0]!, { prompt: `after a 400 ${key}`, num_steps: 10 }, key);
    expect(good.status).toBe(201);
    expect(good.headers.get('idempotent-replayed')).toBeNull();

    const malformed = await post(apis[0]!, { prompt: 'x' }, 'has spaces in it');
    expect(malformed.status).toBe(400);
    expect(await malformed.json()).toMatchObject({ errors: [{ field: 'Idempotency-Key', rule: 'format' }] });
    expect((await post(apis[0]!, { prompt: 'x' }, 'k'.repeat(256))).status).toBe(400);
  });

  it('keys are per tenant: another tenant with the same key gets its own job, and cannot replay this one', async () => {
    const key = randomUUID();
    const body = { prompt: `per tenant ${key}`, num_steps: 10 };
    const mine = (await (await post(apis[0]!, body, key)).json()) as { id: string };
    const theirs = await post(apis[1]!, body, key, otherAuth);
    expect(theirs.status).toBe(201);
    expect(theirs.headers.get('idempotent-replayed')).toBeNull();
    expect(((await theirs.json()) as { id: string }).id).not.toBe(mine.id);
    expect(await jobsWithPrompt(body.prompt)).toBe(2);
    // And another body under that key is a conflict only for the tenant that used it.
    expect((await post(apis[0]!, { ...body, num_steps: 11 }, key)).status).toBe(422);
  });

  it('a key older than 24 hours is free again', async () => {
    const key = randomUUID();
    const prompt = `expired ${key}`;
    const first = (await (await post(apis[0]!, { prompt }, key)).json()) as { id: string };
    await db.query(`UPDATE idempotency_keys SET created_at = now() - interval '24 hours 1 second' WHERE key = $1`, [key]);
    const second = await post(apis[0]!, { prompt: `${prompt} (another body)` }, key);
    expect(second.status).toBe(201);
    expect(second.headers.get('idempotent-replayed')).toBeNull();
    expect(((await second.json()) as { id: string }).id).not.toBe(first.id);
  });
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    checker.expectNoMismatch();
    expect([...checker.seen.keys()]).toEqual(
      expect.arrayContaining(['POST /generated-images 201', 'POST /generated-images 400', 'POST /generated-images 422']),
    );
  });
});
