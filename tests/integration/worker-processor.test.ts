import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createStorage, objectKeyFor, type ImageStorage } from '../../src/adapters/storage.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { Config } from '../../src/config.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { storageOptions } from '../../src/core/wiring.js';
import type { GenerateParams, Generation, Progress } from '../../src/engine/pipeline.js';
import { Engine } from '../../src/engine/thread/engine-host.js';
import { createProcessor, JobReleasedError, type JobLog, type ProcessorDeps } from '../../src/worker/processor.js';
import { CuttableProxy } from '../support/processes.js';
import { createTenant, insertJob } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

/**
 * The worker's job handler against real Postgres and S3 (Swift), running the engine's test
 * double in a real engine thread (src/engine/testing/test-pipeline.ts: progress per step,
 * cancellation, and failure directives such as [test:crash]). Storage outages are real: the
 * handler talks to S3 through a TCP proxy that a test cuts. Where a test must hold a generation
 * at a chosen moment it uses a scripted engine function, named so.
 */

const silent: JobLog = { info() {}, warn() {}, error() {}, debug() {} };

let config: Config;
let db: Db;
let repo: ImagesRepo;
let tenantId: string;
let storage: ImageStorage;
let proxy: CuttableProxy;
let proxiedStorage: ImageStorage;
const engines: Engine[] = [];

beforeAll(async () => {
  config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  repo = createImagesRepo(db);
  tenantId = await createTenant(db);
  storage = createStorage(storageOptions(config));
  await storage.ensureBucket();
  proxy = new CuttableProxy(Number(new URL(config.STORAGE_ENDPOINT).port));
  await proxy.start();
  proxiedStorage = createStorage({ ...storageOptions(config), endpoint: `http://127.0.0.1:${proxy.port}` });
});
afterEach(async () => {
  proxy.restore();
  await Promise.all(engines.splice(0).map((e) => e.close()));
});
afterAll(async () => {
  await proxy?.close();
  await db?.$disconnect();
});

async function newJob(prompt = 'a red circle', steps = 10): Promise<string> {
  const id = randomUUID();
  await insertJob(repo, { id, tenantId, prompt, negativePrompt: null, numSteps: steps, guidanceScale: 9, seed: 1, width: 512, height: 512, scheduler: 'pndm' });
  return id;
}

async function testEngine(stepMs = 2): Promise<Engine> {
  const engine = await Engine.start({ test: { stepMs } });
  engines.push(engine);
  return engine;
}

function processor(engine: ProcessorDeps['engine'], overrides: Partial<ProcessorDeps> = {}) {
  return createProcessor({
    repo,
    storage,
    engine,
    objectKeyFor,
    workerId: 'test-worker',
    modelName: 'test-engine',
    progressIntervalMs: 0,
    log: silent,
    unrecoverable: (m) => Object.assign(new Error(m), { name: 'UnrecoverableError' }),
    ...overrides,
  });
}

/** A PNG whose single pixel says which attempt made it. */
async function pngOf(value: number): Promise<Buffer> {
  return sharp({ create: { width: 1, height: 1, channels: 3, background: { r: value, g: 0, b: 0 } } })
    .png()
    .toBuffer();
}

/** A scripted engine: resolves with `png` (and images 1.. of a job of several, `more`) once `gate` opens. */
function scripted(png: Buffer, gate: Promise<void> = Promise.resolve(), more: Buffer[] = []): ProcessorDeps['engine'] {
  return {
    async generate(params: GenerateParams, run: { onProgress?: (p: Progress) => void }): Promise<Generation> {
      run.onProgress?.({ step: 1, totalSteps: 2, elapsedMs: 1 });
      await gate;
      return {
        png,
        seed: params.seed ?? 0,
        width: 1,
        height: 1,
        numSteps: 2,
        guidanceScale: 9,
        scheduler: 'pndm',
        timings: { encodeMs: 0, denoiseMs: 0, decodeMs: 0, totalMs: 12, sessionRunMs: 0 },
        warnings: [],
        ...(more.length > 0 ? { more: more.map((m, k) => ({ png: m, seed: (params.seed ?? 0) + k + 1 })) } : {}),
      };
    },
  };
}

async function objectsOf(id: string): Promise<string[]> {
  return (await storage.list(`images/${id}/`)).sort();
}

describe('worker job handler', () => {
  it('runs a job: running with progress, then succeeded with the attempt’s own object and a closed attempt row', async () => {
    const id = await newJob('a red circle', 20);
    const seen: number[] = [];
    const counting: ImagesRepo = {
      ...repo,
      setProgress: async (...a) => {
        const r = await repo.setProgress(...a);
        seen.push((await repo.get(id))!.progress);
        return r;
      },
    };
    const run = processor(await testEngine(5), { repo: counting });
    expect(await run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).toBe('succeeded');
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({
      status: 'succeeded',
      progress: 100,
      fileName: objectKeyFor(id, 1),
      attempts: 1,
      workerId: 'test-worker',
      error: null,
      errorCode: null,
    });
    expect(row.finishedAt).toBeInstanceOf(Date);
    expect(await storage.stat(objectKeyFor(id, 1))).toMatchObject({ contentType: 'image/png' });
    expect(await repo.attempts(id)).toMatchObject([{ attempt: 1, workerId: 'test-worker', outcome: 'succeeded', errorCode: null }]);
    // Progress rose while running and never claimed 100 before the image was stored.
    expect(seen.length).toBeGreaterThanOrEqual(10);
    expect(Math.max(...seen)).toBeLessThan(100);
    expect([...seen].sort((a, b) => a - b)).toEqual(seen);
  });

  it('writes progress at most once per interval', async () => {
    const id = await newJob('a red circle', 60);
    const writes: number[] = [];
    const counting: ImagesRepo = { ...repo, setProgress: (...a) => (writes.push(performance.now()), repo.setProgress(...a)) };
    const intervalMs = 100;
    const started = performance.now();
    // 60 steps of 10 ms: the generation lasts about 600 ms, several intervals.
    await processor(await testEngine(10), { repo: counting, progressIntervalMs: intervalMs })({ imageId: id, attempt: 1, maxAttempts: 1, log: silent });
    const elapsed = performance.now() - started;
    const gaps = writes.slice(1).map((t, i) => t - writes[i]!);
    expect(writes.length).toBeGreaterThanOrEqual(3);
    expect(writes.length).toBeLessThanOrEqual(Math.ceil(elapsed / intervalMs) + 1);
    for (const g of gaps) expect(g).toBeGreaterThanOrEqual(intervalMs - 1);
  });

  it('a stale attempt cannot overwrite the attempt that took over its job, in the row or in storage', async () => {
    const id = await newJob();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const stalePng = await pngOf(10);
    const freshPng = await pngOf(200);
    // Stalls past its lock, like a SIGSTOPped worker, then finishes after the other attempt did.
    const staleRun = processor(scripted(stalePng, gate))({ imageId: id, attempt: 1, maxAttempts: 3, log: silent });
    await expect.poll(async () => (await repo.get(id))!.attempts).toBe(1);
    const fresh = processor(scripted(freshPng), { workerId: 'other-worker' });
    expect(await fresh({ imageId: id, attempt: 2, maxAttempts: 3, log: silent })).toBe('succeeded');
    release();
    expect(await staleRun).toBe('superseded');
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', attempts: 2, workerId: 'other-worker', fileName: objectKeyFor(id, 2) });
    // The stale attempt's upload went to its own key and was removed; the URL serves the winner's bytes.
    expect(await objectsOf(id)).toEqual([objectKeyFor(id, 2)]);
    const served = Buffer.from(await (await fetch((await storage.presignGet(objectKeyFor(id, 2))).url)).arrayBuffer());
    expect(served.equals(freshPng)).toBe(true);
    expect((await repo.attempts(id)).map((a) => [a.attempt, a.outcome])).toEqual([
      [1, 'superseded'],
      [2, 'succeeded'],
    ]);
  });

  it('the winning attempt removes objects an earlier attempt stored before it was taken over', async () => {
    const id = await newJob();
    // Attempt 1 stored its object, then its worker died before recording anything.
    await repo.startAttempt(id, 'dead-worker');
    await storage.putPng(objectKeyFor(id, 1), await pngOf(1));
    expect(await processor(scripted(await pngOf(2)))({ imageId: id, attempt: 2, maxAttempts: 3, log: silent })).toBe('succeeded');
    expect(await objectsOf(id)).toEqual([objectKeyFor(id, 2)]);
  });

  it('a job of several images: each attempt stores all of them under its own keys; a superseded attempt removes all of its own, the winner all of earlier attempts’', async () => {
    const id = randomUUID();
    await insertJob(repo, {
      id,
      tenantId,
      prompt: 'a red circle',
      negativePrompt: null,
      numSteps: 10,
      guidanceScale: 9,
      seed: 1,
      width: 512,
      height: 512,
      scheduler: 'pndm',
      numImages: 3,
    });
    // Attempt 1 stored two of its three images, then its worker died before recording anything.
    await repo.startAttempt(id, 'dead-worker');
    for (const k of [0, 1]) await storage.putPng(objectKeyFor(id, 1, k), await pngOf(1));
    // Attempt 2 stalls past its lock, then finishes after attempt 3 did.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const stale = processor(scripted(await pngOf(10), gate, [await pngOf(11), await pngOf(12)]))({ imageId: id, attempt: 2, maxAttempts: 3, log: silent });
    await expect.poll(async () => (await repo.get(id))!.attempts).toBe(2);
    const fresh = await Promise.all([200, 201, 202].map(pngOf));
    const winner = processor(scripted(fresh[0]!, undefined, fresh.slice(1)), { workerId: 'other-worker' });
    expect(await winner({ imageId: id, attempt: 3, maxAttempts: 3, log: silent })).toBe('succeeded');
    release();
    expect(await stale).toBe('superseded');
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', workerId: 'other-worker', fileName: objectKeyFor(id, 3) });
    const keys = [0, 1, 2].map((k) => objectKeyFor(id, 3, k));
    expect(await objectsOf(id)).toEqual([...keys].sort());
    for (const [k, key] of keys.entries()) {
      const served = Buffer.from(await (await fetch((await storage.presignGet(key)).url)).arrayBuffer());
      expect(served.equals(fresh[k]!), `image ${k}`).toBe(true);
    }
  });

  it('parameters the model rejects fail the job at once with invalid_for_model and the reason, unrecoverably', async () => {
    // 500 is no multiple of 8: the engine's own check rejects it.
    const id = randomUUID();
    await insertJob(repo, {
      id,
      tenantId,
      prompt: 'x',
      negativePrompt: null,
      numSteps: 2,
      guidanceScale: 9,
      seed: 1,
      width: 500,
      height: 512,
      scheduler: 'pndm',
    });
    const run = processor(await testEngine());
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toMatchObject({ name: 'UnrecoverableError' });
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({ status: 'failed', errorCode: 'invalid_for_model' });
    expect(row.error).toBe("The request's parameters cannot be used with this model. `height` and `width` have to be divisible by 8 but are 512 and 500");
  });

  it('a model failure is retried with generation_failed, and fails for good on the last attempt; internals stay out of the row', async () => {
    const id = await newJob('a red circle [test:fail]');
    const run = processor(await testEngine());
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 2, log: silent })).rejects.toThrow(/^generation_failed: /);
    expect(await repo.get(id)).toMatchObject({
      status: 'queued',
      errorCode: 'generation_failed',
      error: 'The model failed while generating the image.',
      progress: 0,
    });
    await expect(run({ imageId: id, attempt: 2, maxAttempts: 2, log: silent })).rejects.toMatchObject({ name: 'UnrecoverableError' });
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({ status: 'failed', errorCode: 'generation_failed', attempts: 2 });
    expect(row.error).not.toMatch(/test engine|\[test:fail\]/);
    expect((await repo.attempts(id)).map((a) => [a.outcome, a.errorCode])).toEqual([
      ['retried', 'generation_failed'],
      ['failed', 'generation_failed'],
    ]);
  });

  it('an allocation failure fails with out_of_memory at once, not retried, and the engine goes on', async () => {
    const engine = await testEngine();
    const run = processor(engine);
    const id = await newJob('a red circle [test:oom]');
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toMatchObject({ name: 'UnrecoverableError' });
    expect(await repo.get(id)).toMatchObject({ status: 'failed', errorCode: 'out_of_memory', attempts: 1 });
    expect(engine.alive).toBe(true);
    const next = await newJob('a blue square');
    expect(await run({ imageId: next, attempt: 1, maxAttempts: 3, log: silent })).toBe('succeeded');
  });

  it('an attempt past its deadline is aborted and recorded as timed_out, then retried', async () => {
    // 50 steps of 20 ms is a second; the deadline is 200 ms.
    const id = await newJob('a slow one', 50);
    const run = processor(await testEngine(20), { jobTimeoutMs: 200 });
    const started = performance.now();
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toThrow(/^timed_out: /);
    expect(performance.now() - started).toBeLessThan(800);
    expect(await repo.get(id)).toMatchObject({ status: 'queued', errorCode: 'timed_out', error: 'The job took longer than its time limit of 200 ms.' });
    expect(await repo.attempts(id)).toMatchObject([{ outcome: 'retried', errorCode: 'timed_out' }]);
    expect(await objectsOf(id)).toEqual([]);
  });

  it('storage down: storage_unavailable, retried, never succeeded without its object, no host or port in the row', async () => {
    const id = await newJob();
    proxy.sever();
    const run = processor(await testEngine(), { storage: proxiedStorage });
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 2, log: silent })).rejects.toThrow(/^storage_unavailable: /);
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({
      status: 'queued',
      fileName: null,
      errorCode: 'storage_unavailable',
      error: 'The image was generated but could not be stored.',
    });
    expect(row.error).not.toMatch(/127\.0\.0\.1|ECONNREFUSED|ECONNRESET|STORAGE_/);
    proxy.restore();
    expect(await run({ imageId: id, attempt: 2, maxAttempts: 2, log: silent })).toBe('succeeded');
    expect(await objectsOf(id)).toEqual([objectKeyFor(id, 2)]);
  });

  it('an engine that goes down hands the job back (not a failed attempt); twice on one job fails it as engine_crashed', async () => {
    const id = await newJob('a red circle [test:crash]');
    const first = await testEngine();
    await expect(processor(first)({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toBeInstanceOf(JobReleasedError);
    expect(first.alive).toBe(false);
    expect(await repo.get(id)).toMatchObject({ status: 'queued', attempts: 1, errorCode: null });
    expect(await repo.attempts(id)).toMatchObject([{ outcome: 'engine_failed' }]);
    // The queue does not count a released attempt: the next delivery is attempt 1 again.
    const second = await testEngine();
    await expect(processor(second)({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toMatchObject({ name: 'UnrecoverableError' });
    expect(await repo.get(id)).toMatchObject({ status: 'failed', errorCode: 'engine_crashed', attempts: 2 });
    expect((await repo.attempts(id)).map((a) => a.outcome)).toEqual(['engine_failed', 'engine_failed']);
  });

  it('a cancel seen at a progress write stops the generation between steps', async () => {
    const id = await newJob('a red circle', 150);
    const run = processor(await testEngine(5), { progressIntervalMs: 20 });
    const running = run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent });
    await expect.poll(async () => (await repo.get(id))!.progress, { timeout: 10_000 }).toBeGreaterThan(0);
    await repo.requestCancel(id);
    expect(await running).toBe('canceled');
    expect(await repo.get(id)).toMatchObject({ status: 'canceled' });
    expect(await repo.attempts(id)).toMatchObject([{ outcome: 'canceled' }]);
    expect(await objectsOf(id)).toEqual([]);
  });

  it('skips a job that already ended (a duplicate delivery)', async () => {
    const id = await newJob();
    const engine = await testEngine();
    let calls = 0;
    const counted: ProcessorDeps['engine'] = { generate: (p, r) => (calls++, engine.generate(p, r)) };
    const run = processor(counted);
    await run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent });
    expect(await run({ imageId: id, attempt: 2, maxAttempts: 3, log: silent })).toBe('skipped');
    expect(calls).toBe(1);
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', attempts: 1 });
  });
});
