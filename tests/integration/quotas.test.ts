/**
 * Per-tenant quotas (issue 11, test 4) against real API processes, two at a time, on one
 * Postgres: the cap on jobs queued or running, and the daily pixel-step budget. Concurrent
 * submissions through both processes never overshoot either; past a quota the answer is a 429
 * problem+json naming the quota, its limit and use, and when it resets; each resets as
 * documented (a slot frees when a job ends; the budget at 00:00 UTC). Usage is recorded per job
 * and GET /usage reports it.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { Config } from '../../src/config.js';
import { createTestKey, type TestKey } from '../support/accounts.js';
import { configEnv, startApiProcess, startWorkerProcess, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

const run = promisify(execFile);
const JOB = { prompt: 'a quota test', num_steps: 10, width: 64, height: 64 };
const COST = 64 * 64 * 10;

let config: Config;
let db: Db;
const procs: ServiceProcess[] = [];

beforeAll(async () => {
  // Jobs are submitted with no worker running: the test engine's model is known, so they wait.
  config = await isolatedConfig({ KNOWN_MODELS: 'test-engine' });
  db = createPrismaClient(config.DATABASE_URL);
});

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.$disconnect();
});

async function twoApis(env: Record<string, string>): Promise<string[]> {
  const apis = await Promise.all([startApiProcess(config, env, 'api-a'), startApiProcess(config, env, 'api-b')]);
  procs.push(...apis.map((a) => a.proc));
  return apis.map((a) => a.url);
}

interface Answer {
  status: number;
  retryAfter: string | null;
  contentType: string | null;
  body: Record<string, unknown>;
}

async function post(url: string, key: TestKey, body: object = JOB): Promise<Answer> {
  const res = await fetch(`${url}/generated-images`, {
    method: 'POST',
    headers: { ...key.auth, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return {
    status: res.status,
    retryAfter: res.headers.get('retry-after'),
    contentType: res.headers.get('content-type'),
    body: (await res.json()) as Record<string, unknown>,
  };
}

async function usage(url: string, key: TestKey): Promise<Record<string, unknown>> {
  const res = await fetch(`${url}/usage`, { headers: key.auth });
  expect(res.status).toBe(200);
  return (await res.json()) as Record<string, unknown>;
}

/** 10 submissions at once, alternating between the two processes. */
const burst = (urls: string[], key: TestKey, n = 10) => Promise.all(Array.from({ length: n }, (_, i) => post(urls[i % 2]!, key)));

const nextUtcMidnight = () => {
  const d = new Date();
  return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate() + 1));
};

describe('jobs in flight per tenant', () => {
  const CAP = 3;
  let urls: string[];
  let key: TestKey;

  beforeAll(async () => {
    urls = await twoApis({ TENANT_MAX_IN_FLIGHT: String(CAP), TENANT_DAILY_PIXEL_STEPS: '0', QUEUE_NAME: `${config.QUEUE_NAME}-cap` });
    key = await createTestKey(config.DATABASE_URL, 'capped-co');
  }, 60_000);

  it(`takes exactly ${CAP} of 10 concurrent submissions over two processes; the rest get 429 in_flight`, async () => {
    const answers = await burst(urls, key);
    const accepted = answers.filter((a) => a.status === 201);
    const refused = answers.filter((a) => a.status === 429);
    expect(accepted).toHaveLength(CAP);
    expect(refused).toHaveLength(10 - CAP);
    for (const r of refused) {
      expect(r.contentType).toMatch(/^application\/problem\+json/);
      expect(r.body).toMatchObject({ status: 429, title: 'Quota exceeded', quota: 'in_flight', limit: CAP, used: CAP, resets_at: null });
      expect(r.body.detail).toMatch(/3 jobs queued or running, the most this account may have at once \(3\)/);
      expect(Number(r.retryAfter)).toBeGreaterThan(0);
    }
    expect(await db.generatedImage.count({ where: { tenant: { name: 'capped-co' } } })).toBe(CAP);
    expect(await usage(urls[0]!, key)).toMatchObject({ in_flight: { used: CAP, limit: CAP } });
    // Another tenant is not affected.
    const other = await createTestKey(config.DATABASE_URL, 'uncapped-co');
    expect((await post(urls[1]!, other)).status).toBe(201);
  });

  it('frees a slot when a job is canceled, and every slot when the jobs finish', async () => {
    const queued = await db.generatedImage.findFirstOrThrow({ where: { tenant: { name: 'capped-co' }, status: 'queued' } });
    expect((await fetch(`${urls[0]}/generated-images/${queued.id}/cancel`, { method: 'POST', headers: key.auth })).status).toBe(200);
    expect((await post(urls[1]!, key)).status).toBe(201);
    expect((await post(urls[0]!, key)).status).toBe(429);

    // A worker runs them all; then the tenant may have CAP in flight again.
    const worker = await startWorkerProcess({ ...config, QUEUE_NAME: `${config.QUEUE_NAME}-cap` }, 'quota-worker', 0);
    procs.push(worker);
    const deadline = Date.now() + 30_000;
    while ((await db.generatedImage.count({ where: { tenant: { name: 'capped-co' }, status: { in: ['queued', 'running'] } } })) > 0) {
      expect(Date.now()).toBeLessThan(deadline);
      await new Promise((r) => setTimeout(r, 100));
    }
    await worker.stop();
    expect(await usage(urls[1]!, key)).toMatchObject({ in_flight: { used: 0, limit: CAP } });
    expect((await burst(urls, key)).filter((a) => a.status === 201)).toHaveLength(CAP);
  });

  it("a tenant's own limit (`t2i tenants set`) wins over TENANT_MAX_IN_FLIGHT, until set back to default", async () => {
    const tenants = async (...args: string[]) =>
      (await run(process.execPath, [path.resolve('bin/t2i.js'), 'tenants', ...args], { env: configEnv(config) })).stdout;
    expect(await tenants('set', 'capped-co', '--max-in-flight', '5')).toContain('Tenant "capped-co": max-in-flight 5');
    const more = await burst(urls, key, 4);
    expect(more.filter((a) => a.status === 201)).toHaveLength(2);
    expect(more.find((a) => a.status === 429)?.body).toMatchObject({ quota: 'in_flight', limit: 5, used: 5 });
    expect(JSON.parse(await tenants('list', '--json'))).toContainEqual({ name: 'capped-co', max_in_flight: 5, daily_pixel_steps: null });
    await tenants('set', 'capped-co', '--max-in-flight', 'default');
    expect((await post(urls[0]!, key)).body).toMatchObject({ quota: 'in_flight', limit: CAP, used: 5 });
  });
});

describe('daily pixel-step budget per tenant', () => {
  const BUDGET = 5 * COST;
  let urls: string[];
  let key: TestKey;

  beforeAll(async () => {
    urls = await twoApis({ TENANT_MAX_IN_FLIGHT: '0', TENANT_DAILY_PIXEL_STEPS: String(BUDGET), QUEUE_NAME: `${config.QUEUE_NAME}-budget` });
    key = await createTestKey(config.DATABASE_URL, 'budget-co');
  }, 60_000);

  it('takes exactly the budget of 10 concurrent submissions over two processes; the rest get 429 daily_pixel_steps with the reset time', async () => {
    const answers = await burst(urls, key);
    const accepted = answers.filter((a) => a.status === 201);
    expect(accepted).toHaveLength(5);
    // Usage is recorded per job.
    for (const a of accepted) expect(a.body.pixel_steps).toBe(COST);
    const midnight = nextUtcMidnight();
    for (const r of answers.filter((a) => a.status !== 201)) {
      expect(r.status).toBe(429);
      expect(r.contentType).toMatch(/^application\/problem\+json/);
      expect(r.body).toMatchObject({
        title: 'Quota exceeded',
        quota: 'daily_pixel_steps',
        limit: BUDGET,
        used: BUDGET,
        requested: COST,
        resets_at: midnight.toISOString(),
      });
      expect(r.body.detail).toContain(`resets at ${midnight.toISOString()}`);
      // Retry-After: the seconds until then.
      expect(Math.abs(Number(r.retryAfter) - (midnight.getTime() - Date.now()) / 1000)).toBeLessThan(10);
    }
    const rows = await db.generatedImage.findMany({ where: { tenant: { name: 'budget-co' } }, select: { pixelSteps: true } });
    expect(rows.map((r) => Number(r.pixelSteps))).toEqual(Array(5).fill(COST));
    expect(await usage(urls[0]!, key)).toMatchObject({
      tenant: 'budget-co',
      resets_at: midnight.toISOString(),
      pixel_steps: { used: BUDGET, limit: BUDGET, remaining: 0 },
      jobs_today: 5,
    });
  });

  it('gives back what a job canceled before it ran would have cost, and refuses a job larger than the whole budget', async () => {
    const queued = await db.generatedImage.findFirstOrThrow({ where: { tenant: { name: 'budget-co' }, status: 'queued' } });
    expect((await fetch(`${urls[1]}/generated-images/${queued.id}/cancel`, { method: 'POST', headers: key.auth })).status).toBe(200);
    expect(await usage(urls[0]!, key)).toMatchObject({ pixel_steps: { used: BUDGET - COST, remaining: COST } });
    expect((await post(urls[0]!, key)).status).toBe(201);
    expect((await post(urls[1]!, key)).status).toBe(429);
    const huge = await post(urls[0]!, key, { ...JOB, width: 512, height: 512, num_steps: 50 });
    expect(huge.status).toBe(429);
    expect(huge.body).toMatchObject({ quota: 'daily_pixel_steps', requested: 512 * 512 * 50 });
  });

  it('resets at 00:00 UTC: once the jobs are from yesterday, today is free again', async () => {
    // The day passes: the tenant's jobs, and the day its usage counter counts, now date from
    // yesterday, as they will after midnight.
    await db.$executeRaw`UPDATE generated_images SET created_at = created_at - interval '1 day'
                          WHERE tenant_id = (SELECT id FROM tenants WHERE name = 'budget-co')`;
    await db.$executeRaw`UPDATE tenants SET usage_day = usage_day - 1 WHERE name = 'budget-co'`;
    expect(await usage(urls[1]!, key)).toMatchObject({ pixel_steps: { used: 0, limit: BUDGET, remaining: BUDGET }, jobs_today: 0 });
    expect((await burst(urls, key)).filter((a) => a.status === 201)).toHaveLength(5);
    console.log(
      `quotas: in-flight cap 3 and daily budget ${BUDGET.toLocaleString('en-US')} pixel-steps (5 jobs of ${COST.toLocaleString('en-US')}); ` +
        '10 concurrent submissions over two API processes took exactly 3 and exactly 5; resets: slot on cancel/finish, budget at 00:00 UTC',
    );
  });

  it('charges a job of several images for every image: 3 images use three jobs of the budget, a 3-image job past what is left is refused whole', async () => {
    await db.$executeRaw`UPDATE tenants SET usage_day = usage_day - 1 WHERE name = 'budget-co'`;
    const three = await post(urls[0]!, key, { ...JOB, num_images: 3 });
    expect(three.status).toBe(201);
    expect(three.body).toMatchObject({ num_images: 3, pixel_steps: 3 * COST });
    expect(await usage(urls[1]!, key)).toMatchObject({ pixel_steps: { used: 3 * COST, remaining: 2 * COST } });
    const tooMany = await post(urls[1]!, key, { ...JOB, num_images: 3 });
    expect(tooMany.status).toBe(429);
    expect(tooMany.body).toMatchObject({ quota: 'daily_pixel_steps', used: 3 * COST, requested: 3 * COST });
    expect((await post(urls[0]!, key, { ...JOB, num_images: 2 })).status).toBe(201);
  });
});
