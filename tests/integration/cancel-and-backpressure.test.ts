import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { startApi, type RunningApi } from '../../src/api/main.js';
import { startWorker, type RunningWorker } from '../../src/worker/main.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

/**
 * Cancel, back-pressure and readiness against the running API and a worker on the synthetic
 * engine (each step waits 40 ms, so a job runs long enough to be canceled mid-way).
 *
 * Two systems, each with its own database and queue: one with no worker, where queued jobs stay
 * queued (back-pressure, canceling a queued job), and one with a worker. So no test depends on
 * whether an earlier one started a worker.
 */

const silent = pino({ level: 'silent' });
/** The system without a worker holds its jobs: the test engine's model is known, and so is another, whose queue has its own back-pressure. */
const SETTINGS = { PROGRESS_INTERVAL_MS: '50', MAX_QUEUE_DEPTH: '3', KNOWN_MODELS: 'test-engine,idle-model', DEFAULT_MODEL: 'test-engine' };
/** How long the API trusts a measured queue depth (DEPTH_CACHE_MS in src/core/submission.ts), in ms. */
const DEPTH_CACHE_MS = 1_000;

let queuedOnly: RunningApi | undefined;
let withWorker: RunningApi | undefined;
let worker: RunningWorker | undefined;
/** A tenant's key on each of the two systems. */
const auth: { queuedOnly?: Record<string, string>; withWorker?: Record<string, string> } = {};

beforeAll(async () => {
  const [configA, configB] = await Promise.all([isolatedConfig(SETTINGS), isolatedConfig(SETTINGS)]);
  [auth.queuedOnly, auth.withWorker] = (await Promise.all([createTestKey(configA.DATABASE_URL), createTestKey(configB.DATABASE_URL)])).map((k) => k.auth);
  [queuedOnly, withWorker, worker] = await Promise.all([
    startApi(configA, { logger: silent }),
    startApi(configB, { logger: silent }),
    startWorker(configB, { logger: silent, testEngine: { stepMs: 40 } }),
  ]);
});

afterAll(async () => {
  await worker?.close();
  await Promise.allSettled([queuedOnly?.close(), withWorker?.close()]);
});

interface JobJson {
  id: string;
  status: string;
  progress: number;
  attempts: number;
  file_name: string | null;
  cancel_requested_at: string | null;
  finished_at: string | null;
}

const client = (api: () => RunningApi | undefined, key: () => Record<string, string> | undefined) => {
  const base = () => {
    const a = api();
    if (!a) throw new Error('the API did not start (see beforeAll)');
    return a.url;
  };
  // The tenant's API key on every request, as its client sends it.
  const headers = () => key() ?? {};
  return {
    post: (body: object) =>
      fetch(`${base()}/generated-images`, { method: 'POST', headers: { ...headers(), 'content-type': 'application/json' }, body: JSON.stringify(body) }),
    cancel: (id: string) => fetch(`${base()}/generated-images/${id}/cancel`, { method: 'POST', headers: headers() }),
    get: async (id: string) => (await (await fetch(`${base()}/generated-images/${id}`, { headers: headers() })).json()) as JobJson,
    url: (path: string) => fetch(`${base()}${path}`, { headers: headers() }),
  };
};
const noWorker = client(
  () => queuedOnly,
  () => auth.queuedOnly,
);
const running = client(
  () => withWorker,
  () => auth.withWorker,
);

/** Resolves once performance.now() (the in-process API's clock) is past `t`. */
async function clockPasses(t: number): Promise<void> {
  while (performance.now() <= t) await new Promise((r) => setTimeout(r, t - performance.now() + 1));
}

describe('back-pressure', () => {
  it('answers 503 with Retry-After once the queue holds MAX_QUEUE_DEPTH jobs, and accepts again when it drains', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await noWorker.post({ prompt: `job ${i}`, num_steps: 5 });
      expect(r.status).toBe(201);
      ids.push(((await r.json()) as { id: string }).id);
    }
    // The depth the API last measured is at most DEPTH_CACHE_MS old; past that, the next POST
    // measures again and sees the full queue.
    await clockPasses(performance.now() + DEPTH_CACHE_MS);
    const full = await noWorker.post({ prompt: 'one too many' });
    expect(full.status).toBe(503);
    expect(full.headers.get('content-type')).toContain('application/problem+json');
    expect(Number(full.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(((await full.json()) as { detail: string }).detail).toMatch(/queue of model "test-engine" is full \(3 jobs waiting\)/);
    // Each model's queue has its own bound: another model's requests are still taken.
    const other = await noWorker.post({ prompt: 'another model', model: 'idle-model' });
    expect(other.status).toBe(201);
    expect((await noWorker.cancel(((await other.json()) as { id: string }).id)).status).toBe(200);

    // Canceling queued jobs removes them from the queue, which makes room again.
    for (const id of ids) {
      const r = await noWorker.cancel(id);
      expect(r.status).toBe(200);
      expect(await r.json()).toMatchObject({ id, status: 'canceled', progress: 0 });
    }
    await clockPasses(performance.now() + DEPTH_CACHE_MS);
    const again = await noWorker.post({ prompt: 'room again', num_steps: 2 });
    expect(again.status).toBe(201);
    await noWorker.cancel(((await again.json()) as { id: string }).id);
  });
});

describe('cancel', () => {
  it('is idempotent on a queued job, and the job never runs', async () => {
    const { id } = (await (await noWorker.post({ prompt: 'never runs' })).json()) as { id: string };
    const first = await noWorker.cancel(id);
    const second = await noWorker.cancel(id);
    expect([first.status, second.status]).toEqual([200, 200]);
    const job = await noWorker.get(id);
    expect(job).toMatchObject({ status: 'canceled', attempts: 0, file_name: null });
    expect(typeof job.cancel_requested_at).toBe('string');
    expect(typeof job.finished_at).toBe('string');
    const url = await noWorker.url(`/generated-images/${id}/url`);
    expect(url.status).toBe(400);
    expect(((await url.json()) as { detail: string }).detail).toBe('The job was canceled; there is no image.');
  });

  it('stops a running job between steps', async () => {
    const { id } = (await (await running.post({ prompt: 'long job', num_steps: 50 })).json()) as { id: string };
    await expect.poll(async () => (await running.get(id)).progress, { timeout: 10_000, interval: 20 }).toBeGreaterThan(0);
    const r = await running.cancel(id);
    expect(r.status).toBe(200);
    const answer = (await r.json()) as JobJson;
    expect(answer).toMatchObject({ id, status: 'running' });
    expect(typeof answer.cancel_requested_at).toBe('string');
    await expect.poll(async () => (await running.get(id)).status, { timeout: 10_000, interval: 20 }).toBe('canceled');
    const job = await running.get(id);
    expect(job.progress).toBeLessThan(100);
    expect(job.file_name).toBeNull();
    // The worker goes on with the next job.
    const next = (await (await running.post({ prompt: 'after the cancel', num_steps: 3 })).json()) as { id: string };
    await expect.poll(async () => (await running.get(next.id)).status, { timeout: 10_000, interval: 20 }).toBe('succeeded');
  });

  it('refuses to cancel a finished job, and answers 404 for unknown ids', async () => {
    const { id } = (await (await running.post({ prompt: 'quick', num_steps: 1 })).json()) as { id: string };
    await expect.poll(async () => (await running.get(id)).status, { timeout: 10_000, interval: 20 }).toBe('succeeded');
    const r = await running.cancel(id);
    expect(r.status).toBe(409);
    expect(((await r.json()) as { detail: string }).detail).toBe('The job already succeeded; there is nothing to cancel.');
    expect((await running.cancel('00000000-0000-4000-8000-000000000000')).status).toBe(404);
    expect((await running.cancel('not-an-id')).status).toBe(404);
  });
});

describe('health', () => {
  it('reports the API and the worker ready with every dependency checked', async () => {
    const a = await running.url('/readyz');
    expect(a.status).toBe(200);
    expect(await a.json()).toEqual({ status: 'ready', checks: { postgres: 'ok', redis: 'ok', storage: 'ok' } });
    const w = await fetch(`${worker!.metricsUrl}/readyz`);
    expect(w.status).toBe(200);
    expect(await w.json()).toEqual({ status: 'ready', checks: { engine: 'ok', postgres: 'ok', redis: 'ok', storage: 'ok' } });
  });
});
