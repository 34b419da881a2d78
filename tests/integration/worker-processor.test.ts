import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createStorage, objectKeyFor, type ImageStorage } from '../../src/adapters/storage.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { InvalidParamsError, type GenerateParams, type Generation, type Progress } from '../../src/engine/pipeline.js';
import { storageOptions } from '../../src/core/wiring.js';
import { createProcessor, type JobLog, type ProcessorDeps } from '../../src/worker/processor.js';
import { isolatedConfig } from '../support/system.js';

/**
 * The worker's job handler against real Postgres and S3, with engines that are plain functions
 * (the engine itself is tested in tests/engine).
 */

const silent: JobLog = { info() {}, warn() {}, error() {}, debug() {} };
const PNG = Buffer.from(
  '89504e470d0a1a0a0000000d49484452000000010000000108020000009077530de0000000c4944415408d763f8cfc0f0000300010005fe0b1d0000000049454e44ae426082',
  'hex',
);

let db: Db;
let repo: ImagesRepo;
let storage: ImageStorage;

beforeAll(async () => {
  const config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  repo = createImagesRepo(db);
  storage = createStorage(storageOptions(config));
  await storage.ensureBucket();
});
afterAll(async () => {
  await db?.$disconnect();
});

async function newJob(steps = 10): Promise<string> {
  const id = randomUUID();
  await repo.create({
    id,
    prompt: 'a red circle',
    negativePrompt: null,
    numSteps: steps,
    guidanceScale: 9,
    seed: 1,
    width: 512,
    height: 512,
    scheduler: 'pndm',
  });
  return id;
}

type FakeGenerate = (params: GenerateParams, run: { onProgress?: (p: Progress) => void; signal?: AbortSignal }) => Promise<Generation>;

function generation(params: GenerateParams): Generation {
  return {
    png: PNG,
    seed: params.seed ?? 0,
    width: params.width ?? 512,
    height: params.height ?? 512,
    numSteps: params.numSteps ?? 50,
    guidanceScale: params.guidanceScale ?? 9,
    scheduler: params.scheduler ?? 'pndm',
    timings: { encodeMs: 0, denoiseMs: 0, decodeMs: 0, totalMs: 12, sessionRunMs: 0 },
    warnings: [],
  };
}

function processor(generate: FakeGenerate, overrides: Partial<ProcessorDeps> = {}) {
  return createProcessor({
    repo,
    storage,
    engine: { generate },
    objectKeyFor,
    workerId: 'test-worker',
    modelName: 'fake',
    progressIntervalMs: 0,
    log: silent,
    unrecoverable: (m) => Object.assign(new Error(m), { name: 'UnrecoverableError' }),
    ...overrides,
  });
}

describe('worker job handler', () => {
  it('runs a job: running with progress, then succeeded with the stored object', async () => {
    const id = await newJob();
    const seen: number[] = [];
    const run = processor(async (params, { onProgress }) => {
      for (let step = 1; step <= 10; step++) {
        onProgress?.({ step, totalSteps: 10, elapsedMs: step });
        await new Promise((r) => setTimeout(r, 5));
        seen.push((await repo.get(id))!.progress);
      }
      expect(params).toMatchObject({ prompt: 'a red circle', numSteps: 10, seed: 1, scheduler: 'pndm' });
      return generation(params);
    });
    expect(await run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).toBe('succeeded');
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({
      status: 'succeeded',
      progress: 100,
      fileName: objectKeyFor(id),
      attempts: 1,
      workerId: 'test-worker',
      error: null,
      model: 'fake',
    });
    expect(row.startedAt).toBeInstanceOf(Date);
    expect(row.finishedAt).toBeInstanceOf(Date);
    expect(await storage.stat(objectKeyFor(id))).toMatchObject({ size: PNG.length, contentType: 'image/png' });
    // Progress rose while running and never claimed 100 before the image was stored.
    expect(seen.at(-1)).toBeGreaterThan(0);
    expect(Math.max(...seen)).toBeLessThan(100);
    expect([...seen].sort((a, b) => a - b)).toEqual(seen);
  });

  it('writes progress at most once per interval', async () => {
    const id = await newJob(200);
    let writes = 0;
    const counting: ImagesRepo = { ...repo, setProgress: (...a) => (writes++, repo.setProgress(...a)) };
    const run = processor(
      async (params, { onProgress }) => {
        for (let step = 1; step <= 200; step++) onProgress?.({ step, totalSteps: 200, elapsedMs: step });
        return generation(params);
      },
      { repo: counting, progressIntervalMs: 60_000 },
    );
    await run({ imageId: id, attempt: 1, maxAttempts: 1, log: silent });
    expect(writes).toBe(1);
  });

  it('a stale attempt cannot overwrite the attempt that took over its job', async () => {
    const id = await newJob();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const stale = processor(async (params) => {
      await gate; // stalls past its lock, like a SIGSTOPped worker
      return { ...generation(params), timings: { ...generation(params).timings, totalMs: 999 } };
    });
    const staleRun = stale({ imageId: id, attempt: 1, maxAttempts: 3, log: silent });
    await expect.poll(async () => (await repo.get(id))!.attempts).toBe(1);
    // Another worker takes the job over and finishes it.
    const fresh = processor(async (params) => generation(params), { workerId: 'other-worker' });
    expect(await fresh({ imageId: id, attempt: 2, maxAttempts: 3, log: silent })).toBe('succeeded');
    release();
    expect(await staleRun).toBe('superseded');
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', attempts: 2, workerId: 'other-worker', generationMs: 12 });
  });

  it('parameters the model rejects fail the job at once, unrecoverably', async () => {
    const id = await newJob();
    const run = processor(async () => {
      throw new InvalidParamsError('`height` and `width` have to be divisible by 8 but are 500 and 512');
    });
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent })).rejects.toMatchObject({ name: 'UnrecoverableError' });
    expect(await repo.get(id)).toMatchObject({ status: 'failed', error: '`height` and `width` have to be divisible by 8 but are 500 and 512' });
  });

  it('a transient failure goes back to the queue with its reason, and fails for good on the last attempt', async () => {
    const id = await newJob();
    const run = processor(async () => {
      throw new Error('CUDA out of memory');
    });
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 2, log: silent })).rejects.toThrow('CUDA out of memory');
    expect(await repo.get(id)).toMatchObject({ status: 'queued', error: 'generation failed: CUDA out of memory', progress: 0 });
    await expect(run({ imageId: id, attempt: 2, maxAttempts: 2, log: silent })).rejects.toThrow('CUDA out of memory');
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({ status: 'failed', error: 'generation failed: CUDA out of memory', attempts: 2 });
    expect(row.finishedAt).toBeInstanceOf(Date);
  });

  it('never says succeeded when the object could not be stored', async () => {
    const id = await newJob();
    const brokenStorage = { ...storage, putPng: async () => Promise.reject(new Error('connect ECONNREFUSED')), stat: storage.stat };
    const run = processor(async (params) => generation(params), { storage: brokenStorage });
    await expect(run({ imageId: id, attempt: 1, maxAttempts: 1, log: silent })).rejects.toThrow('ECONNREFUSED');
    expect(await repo.get(id)).toMatchObject({ status: 'failed', fileName: null, error: 'storing the image failed: connect ECONNREFUSED' });
  });

  it('skips a job that already ended (a duplicate delivery)', async () => {
    const id = await newJob();
    let calls = 0;
    const run = processor(async (params) => (calls++, generation(params)));
    await run({ imageId: id, attempt: 1, maxAttempts: 3, log: silent });
    expect(await run({ imageId: id, attempt: 2, maxAttempts: 3, log: silent })).toBe('skipped');
    expect(calls).toBe(1);
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', attempts: 1 });
  });
});
