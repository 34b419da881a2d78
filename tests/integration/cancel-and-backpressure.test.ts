import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { startApi, type RunningApi } from '../../src/api/main.js';
import { startWorker, type RunningWorker } from '../../src/worker/main.js';
import type { Config } from '../../src/config.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

/**
 * Cancel, back-pressure and readiness against the running API and a worker on the synthetic
 * engine (each step waits 40 ms, so a job runs long enough to be canceled mid-way).
 */

const silent = pino({ level: 'silent' });
let api: RunningApi;
let worker: RunningWorker | undefined;
let base: string;
let config: Config;
let auth: { authorization: string };

beforeAll(async () => {
  config = await isolatedConfig({ PROGRESS_INTERVAL_MS: '50', MAX_QUEUE_DEPTH: '3' });
  ({ auth } = await createTestKey(config.DATABASE_URL));
  api = await startApi(config, { logger: silent });
  base = api.url;
});

/** The worker starts only when a test needs it: until then queued jobs stay queued. */
async function ensureWorker(): Promise<RunningWorker> {
  worker ??= await startWorker(config, { logger: silent, testEngine: { stepMs: 40 } });
  return worker;
}

afterAll(async () => {
  await worker?.close();
  await api?.close();
});

const post = (body: object) =>
  fetch(`${base}/generated-images`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: JSON.stringify(body) });
const cancel = (id: string) => fetch(`${base}/generated-images/${id}/cancel`, { method: 'POST', headers: auth });
const get = async (id: string) => (await (await fetch(`${base}/generated-images/${id}`, { headers: auth })).json()) as Record<string, unknown>;

describe('back-pressure', () => {
  it('answers 503 with Retry-After once the queue holds MAX_QUEUE_DEPTH jobs, and accepts again when it drains', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await post({ prompt: `job ${i}`, num_steps: 5 });
      expect(r.status).toBe(201);
      ids.push(((await r.json()) as { id: string }).id);
    }
    // The depth is cached for a second: wait it out so the full queue is seen.
    await new Promise((r) => setTimeout(r, 1_100));
    const full = await post({ prompt: 'one too many' });
    expect(full.status).toBe(503);
    expect(full.headers.get('content-type')).toContain('application/problem+json');
    expect(Number(full.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(((await full.json()) as { detail: string }).detail).toMatch(/queue is full \(3 jobs waiting\)/);

    // Canceling queued jobs removes them from the queue, which makes room again.
    for (const id of ids) {
      const r = await cancel(id);
      expect(r.status).toBe(200);
      expect(await r.json()).toMatchObject({ id, status: 'canceled', progress: 0 });
    }
    await new Promise((r) => setTimeout(r, 1_100));
    const again = await post({ prompt: 'room again', num_steps: 2 });
    expect(again.status).toBe(201);
    await cancel(((await again.json()) as { id: string }).id);
  });
});

describe('cancel', () => {
  it('is idempotent on a queued job, and the job never runs', async () => {
    const { id } = (await (await post({ prompt: 'never runs' })).json()) as { id: string };
    const first = await cancel(id);
    const second = await cancel(id);
    expect([first.status, second.status]).toEqual([200, 200]);
    const job = await get(id);
    expect(job).toMatchObject({ status: 'canceled', attempts: 0, file_name: null });
    expect(job.cancel_requested_at).toEqual(expect.any(String));
    expect(job.finished_at).toEqual(expect.any(String));
    const url = await fetch(`${base}/generated-images/${id}/url`, { headers: auth });
    expect(url.status).toBe(400);
    expect(((await url.json()) as { detail: string }).detail).toBe('The job was canceled; there is no image.');
  });

  it('stops a running job between steps', async () => {
    await ensureWorker();
    const { id } = (await (await post({ prompt: 'long job', num_steps: 50 })).json()) as { id: string };
    await expect.poll(async () => (await get(id)).progress as number, { timeout: 10_000, interval: 20 }).toBeGreaterThan(0);
    const r = await cancel(id);
    expect(r.status).toBe(200);
    expect(await r.json()).toMatchObject({ id, status: 'running', cancel_requested_at: expect.any(String) });
    await expect.poll(async () => (await get(id)).status, { timeout: 10_000, interval: 20 }).toBe('canceled');
    const job = await get(id);
    expect(job.progress as number).toBeLessThan(100);
    expect(job.file_name).toBeNull();
    // The worker goes on with the next job.
    const next = (await (await post({ prompt: 'after the cancel', num_steps: 3 })).json()) as { id: string };
    await expect.poll(async () => (await get(next.id)).status, { timeout: 10_000, interval: 20 }).toBe('succeeded');
  });

  it('refuses to cancel a finished job, and answers 404 for unknown ids', async () => {
    await ensureWorker();
    const { id } = (await (await post({ prompt: 'quick', num_steps: 1 })).json()) as { id: string };
    await expect.poll(async () => (await get(id)).status, { timeout: 10_000, interval: 20 }).toBe('succeeded');
    const r = await cancel(id);
    expect(r.status).toBe(409);
    expect(((await r.json()) as { detail: string }).detail).toBe('The job already succeeded; there is nothing to cancel.');
    expect((await cancel('00000000-0000-4000-8000-000000000000')).status).toBe(404);
    expect((await cancel('not-an-id')).status).toBe(404);
  });
});

describe('health', () => {
  it('reports the API and the worker ready with every dependency checked', async () => {
    const a = await fetch(`${base}/readyz`);
    expect(a.status).toBe(200);
    expect(await a.json()).toEqual({ status: 'ready', checks: { postgres: 'ok', redis: 'ok', storage: 'ok' } });
    const w = await fetch(`${(await ensureWorker()).metricsUrl}/readyz`);
    expect(w.status).toBe(200);
    expect(await w.json()).toEqual({ status: 'ready', checks: { engine: 'ok', postgres: 'ok', redis: 'ok', storage: 'ok' } });
  });
});
