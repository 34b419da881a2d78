import type { ImagesRepo } from '../core/images.js';
import type { GenerateParams, Generation, Progress } from '../engine/pipeline.js';
import type { SchedulerName } from '../engine/schedulers/types.js';

/**
 * What a worker does with one job: claim the attempt, run the engine, store the PNG, record
 * the outcome. Collaborators are passed in, so tests can give other ones.
 */

export interface ProcessorDeps {
  repo: ImagesRepo;
  storage: {
    putPng(key: string, png: Buffer): Promise<unknown>;
    stat(key: string): Promise<{ size: number } | null>;
  };
  engine: {
    generate(params: GenerateParams, run: { onProgress?: (p: Progress) => void; signal?: AbortSignal }): Promise<Generation>;
  };
  objectKeyFor(imageId: string): string;
  workerId: string;
  modelName: string;
  /** Shortest interval between progress writes. */
  progressIntervalMs: number;
  log: JobLog;
  /** Marks an error as one retrying cannot fix (BullMQ's UnrecoverableError). */
  unrecoverable(message: string): Error;
}

export interface JobLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

export interface JobInput {
  imageId: string;
  attempt: number;
  maxAttempts: number;
  log: JobLog;
  signal?: AbortSignal;
}

export type JobOutcome = 'succeeded' | 'skipped' | 'superseded';

export function createProcessor(deps: ProcessorDeps) {
  return async function processJob(job: JobInput): Promise<JobOutcome> {
    const { imageId, log } = job;
    const claimed = await deps.repo.startAttempt(imageId, deps.workerId);
    if (!claimed) {
      // Finished, failed or canceled already (a duplicate delivery or a late retry): nothing to do.
      log.info({}, 'job is no longer pending; skipping');
      return 'skipped';
    }
    const { record, attempt } = claimed;
    const started = performance.now();
    log.info({ dbAttempt: attempt, steps: record.numSteps, scheduler: record.scheduler, size: `${record.width}x${record.height}` }, 'generation started');
    log.debug({ prompt: record.prompt, negativePrompt: record.negativePrompt }, 'prompt');

    // Progress goes to Postgres at most every progressIntervalMs (the textbook wrote every step),
    // one write at a time; the final 100 is written with the result.
    let lastWrite = Number.NEGATIVE_INFINITY;
    let writing: Promise<unknown> = Promise.resolve();
    const onProgress = (p: Progress) => {
      const now = performance.now();
      if (p.step >= p.totalSteps || now - lastWrite < deps.progressIntervalMs) return;
      lastWrite = now;
      const percent = Math.min(99, Math.floor((p.step / p.totalSteps) * 100));
      writing = writing.then(() =>
        deps.repo.setProgress(imageId, attempt, percent).catch((err: unknown) => log.warn({ err }, 'progress write failed')),
      );
    };

    let generation: Generation;
    try {
      generation = await deps.engine.generate(
        {
          prompt: record.prompt,
          negativePrompt: record.negativePrompt,
          numSteps: record.numSteps,
          guidanceScale: record.guidanceScale,
          seed: record.seed,
          width: record.width,
          height: record.height,
          scheduler: record.scheduler as SchedulerName,
        },
        { onProgress, ...(job.signal ? { signal: job.signal } : {}) },
      );
    } catch (err) {
      await writing;
      const e = err as Error;
      if (e.name === 'InvalidParamsError') {
        // The parameters can never work on this model: fail now, do not retry.
        await deps.repo.fail(imageId, attempt, e.message, true);
        log.warn({ err: e, outcome: 'failed' }, 'generation rejected its parameters');
        throw deps.unrecoverable(e.message);
      }
      await recordFailure(deps, job, attempt, `generation failed: ${e.message}`);
      throw err;
    }
    await writing;

    const key = deps.objectKeyFor(imageId);
    try {
      await deps.storage.putPng(key, generation.png);
      // A row must never say succeeded without its object: check it is there and whole.
      const stored = await deps.storage.stat(key);
      if (!stored || stored.size !== generation.png.length) {
        throw new Error(`stored object ${key} is ${stored ? `${stored.size} bytes, expected ${generation.png.length}` : 'missing'}`);
      }
    } catch (err) {
      await recordFailure(deps, job, attempt, `storing the image failed: ${(err as Error).message}`);
      throw err;
    }

    const ok = await deps.repo.succeed(imageId, attempt, {
      fileName: key,
      generationMs: generation.timings.totalMs,
      model: deps.modelName,
    });
    const durationMs = Math.round(performance.now() - started);
    if (!ok) {
      // Another attempt owns the row now (this worker stalled past its lock): its result stands.
      log.warn({ dbAttempt: attempt, durationMs, outcome: 'superseded' }, 'job was taken over by another attempt; result discarded');
      return 'superseded';
    }
    log.info({ dbAttempt: attempt, durationMs, seed: generation.seed, outcome: 'succeeded' }, 'job succeeded');
    return 'succeeded';
  };
}

async function recordFailure(deps: ProcessorDeps, job: JobInput, attempt: number, message: string): Promise<void> {
  const final = job.attempt >= job.maxAttempts;
  await deps.repo.fail(job.imageId, attempt, message, final).catch((err: unknown) => job.log.error({ err }, 'could not record the failure'));
  job.log.warn({ dbAttempt: attempt, final, outcome: final ? 'failed' : 'retrying' }, message);
}
