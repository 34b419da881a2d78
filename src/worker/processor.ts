import type { ImagesRepo } from '../core/images.js';
import { scrubSecrets } from '../core/logger.js';
import type { ReportContext } from '../core/reporting.js';
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
    generate(params: GenerateParams, run: { onProgress?: (p: Progress) => void; signal?: AbortSignal; log?: EngineLog }): Promise<Generation>;
  };
  objectKeyFor(imageId: string): string;
  workerId: string;
  modelName: string;
  /** Shortest interval between progress writes. */
  progressIntervalMs: number;
  log: JobLog;
  /** Marks an error as one retrying cannot fix (BullMQ's UnrecoverableError). */
  unrecoverable(message: string): Error;
  /** Job counts and durations (src/worker/metrics.ts); nothing is recorded when absent. */
  metrics?: JobMetrics;
  /** Where failed attempts are reported (Sentry), tagged with job id, attempt, model and scheduler. */
  reporter?: { capture(err: unknown, ctx?: ReportContext): void };
}

/**
 * How an attempt ended, as metrics count it: `retried` is a failed attempt that the queue will
 * retry; `released` one handed back unfinished at shutdown.
 */
export type MetricOutcome = 'succeeded' | 'failed' | 'retried' | 'skipped' | 'superseded' | 'canceled' | 'released';

export interface JobMetrics {
  /** An attempt starts; the queue wait is given for first attempts only (later ones include backoff). */
  started(queueWaitSeconds?: number): void;
  step(seconds: number): void;
  finished(outcome: MetricOutcome, seconds: number): void;
}

/** A line from the engine thread about this job's generation. */
export type EngineLog = (level: 'debug' | 'info' | 'warn', msg: string) => void;

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
  /** Aborted when the worker must give the job back (its shutdown grace period ran out). */
  signal?: AbortSignal;
  /** The queue's job id, for error reports. */
  jobId?: string;
  /** When the job was first submitted, for the queue-wait metric. */
  enqueuedAt?: Date;
}

export type JobOutcome = 'succeeded' | 'skipped' | 'superseded' | 'canceled';

/**
 * Thrown when an attempt was handed back unfinished (worker shutdown): the queue should run the
 * job again without counting a failed attempt.
 */
export class JobReleasedError extends Error {
  // The queue adapter recognises the name (RELEASED_ERROR_NAME); the processor imports no queue code.
  override name = 'JobReleasedError';
}

type StopReason = 'canceled' | 'superseded' | 'shutdown';

/** What the attempt learned about its job, for the report if it fails. */
interface Seen {
  scheduler?: string;
  secrets: string[];
}

export function createProcessor(deps: ProcessorDeps) {
  const attempt = createAttempt(deps);
  return async function processJob(job: JobInput): Promise<JobOutcome> {
    const started = performance.now();
    const seen: Seen = { secrets: [] };
    const queueWait = job.attempt === 1 && job.enqueuedAt ? (Date.now() - job.enqueuedAt.getTime()) / 1000 : undefined;
    deps.metrics?.started(queueWait);
    try {
      const outcome = await attempt(job, seen);
      deps.metrics?.finished(outcome, (performance.now() - started) / 1000);
      return outcome;
    } catch (err) {
      if (err instanceof JobReleasedError) {
        deps.metrics?.finished('released', (performance.now() - started) / 1000);
        job.log.info({ outcome: 'released' }, err.message);
        throw err;
      }
      const final = job.attempt >= job.maxAttempts || (err as Error | undefined)?.name === 'UnrecoverableError';
      const durationMs = Math.round(performance.now() - started);
      deps.metrics?.finished(final ? 'failed' : 'retried', durationMs / 1000);
      job.log.error({ err: withoutTexts(err, seen.secrets), outcome: final ? 'failed' : 'retrying', final, durationMs }, 'job attempt failed');
      deps.reporter?.capture(err, {
        level: final ? 'error' : 'warning',
        tags: {
          jobId: job.jobId ?? job.imageId,
          imageId: job.imageId,
          attempt: job.attempt,
          maxAttempts: job.maxAttempts,
          final,
          model: deps.modelName,
          scheduler: seen.scheduler,
          workerId: deps.workerId,
        },
        redact: seen.secrets,
      });
      throw err;
    }
  };
}

function createAttempt(deps: ProcessorDeps) {
  return async function attemptJob(job: JobInput, seen: Seen): Promise<JobOutcome> {
    const { imageId, log } = job;
    const claimed = await deps.repo.startAttempt(imageId, deps.workerId);
    if (!claimed) {
      // Canceled while its previous attempt's worker was gone: end it as canceled now.
      if (await deps.repo.finishCanceled(imageId)) {
        log.info({ outcome: 'canceled' }, 'job was canceled before it could run');
        return 'canceled';
      }
      // Finished, failed or canceled already (a duplicate delivery or a late retry): nothing to do.
      log.info({}, 'job is no longer pending; skipping');
      return 'skipped';
    }
    const { record, attempt } = claimed;
    seen.scheduler = record.scheduler;
    // Prompts are user data: an error text that quotes one must not carry it to the error tracker.
    seen.secrets.push(record.prompt, ...(record.negativePrompt ? [record.negativePrompt] : []));
    const started = performance.now();
    log.info({ dbAttempt: attempt, steps: record.numSteps, scheduler: record.scheduler, size: `${record.width}x${record.height}` }, 'generation started');
    log.debug({ prompt: record.prompt, negativePrompt: record.negativePrompt }, 'prompt');

    // Progress goes to Postgres at most every progressIntervalMs (the textbook wrote every step),
    // one write at a time; the final 100 is written with the result.
    let lastWrite = Number.NEGATIVE_INFINITY;
    let writing: Promise<unknown> = Promise.resolve();
    // Stops the generation between steps: canceled by a user, taken over by another attempt, or
    // handed back because this worker is shutting down.
    const stop = new AbortController();
    const stopFor = (reason: StopReason) => {
      if (!stop.signal.aborted) stop.abort(reason);
    };
    const onShutdown = () => stopFor('shutdown');
    if (job.signal?.aborted) onShutdown();
    job.signal?.addEventListener('abort', onShutdown, { once: true });
    let lastElapsedMs: number | undefined;
    const onProgress = (p: Progress) => {
      // Step time from the engine; without it, the gap since the previous step (the first one would include encoding).
      const stepMs = p.stepMs ?? (lastElapsedMs === undefined ? undefined : p.elapsedMs - lastElapsedMs);
      lastElapsedMs = p.elapsedMs;
      if (stepMs !== undefined) deps.metrics?.step(stepMs / 1000);
      const now = performance.now();
      if (p.step >= p.totalSteps || now - lastWrite < deps.progressIntervalMs) return;
      lastWrite = now;
      const percent = Math.min(99, Math.floor((p.step / p.totalSteps) * 100));
      writing = writing.then(() =>
        deps.repo.setProgress(imageId, attempt, percent).then(
          (state) => {
            if (!state.owned) stopFor('superseded');
            else if (state.cancelRequested) stopFor('canceled');
          },
          (err: unknown) => log.warn({ err }, 'progress write failed'),
        ),
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
        {
          onProgress,
          // The engine thread's lines about this generation, with this job's id, attempt and worker on them.
          log: (level, msg) => logEngineLine(log, level, msg),
          signal: stop.signal,
        },
      );
    } catch (err) {
      await writing;
      job.signal?.removeEventListener('abort', onShutdown);
      const e = err as Error;
      if (e.name === 'AbortError' && stop.signal.aborted) return stopped(deps, job, attempt, stop.signal.reason as StopReason);
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
    job.signal?.removeEventListener('abort', onShutdown);
    // A cancel or takeover seen at the last progress write still wins over storing the result.
    if (stop.signal.aborted && stop.signal.reason !== 'shutdown') return stopped(deps, job, attempt, stop.signal.reason as StopReason);

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

/** Ends an attempt that was stopped between steps, as its reason says. */
async function stopped(deps: ProcessorDeps, job: JobInput, attempt: number, reason: StopReason): Promise<JobOutcome> {
  if (reason === 'canceled') {
    await deps.repo.finishCanceled(job.imageId, attempt);
    job.log.info({ dbAttempt: attempt, outcome: 'canceled' }, 'job canceled between steps');
    return 'canceled';
  }
  if (reason === 'superseded') {
    job.log.warn({ dbAttempt: attempt, outcome: 'superseded' }, 'job was taken over by another attempt; stopped');
    return 'superseded';
  }
  await deps.repo.release(job.imageId, attempt, 'the worker shut down during the job; it will run again');
  throw new JobReleasedError('worker shutting down: job handed back to the queue');
}

async function recordFailure(deps: ProcessorDeps, job: JobInput, attempt: number, message: string): Promise<void> {
  const final = job.attempt >= job.maxAttempts;
  await deps.repo.fail(job.imageId, attempt, message, final).catch((err: unknown) => job.log.error({ err }, 'could not record the failure'));
  job.log.warn({ dbAttempt: attempt, final, outcome: final ? 'failed' : 'retrying' }, message);
}

/**
 * An engine line in the job's log. The engine quotes user text (the dropped part of a truncated
 * prompt): above debug the quotes are emptied, and the whole line goes to debug.
 */
function logEngineLine(log: JobLog, level: 'debug' | 'info' | 'warn', msg: string): void {
  const quoted = /"[^"]*"/g;
  if (level === 'debug' || !quoted.test(msg)) {
    log[level]({ component: 'engine' }, msg);
    return;
  }
  log.debug({ component: 'engine' }, msg);
  log[level]({ component: 'engine' }, msg.replace(quoted, '"[prompt text at debug level]"'));
}

/** The error as logged: its message and stack without the job's prompts (an engine error may quote them). */
function withoutTexts(err: unknown, texts: readonly string[]): unknown {
  if (!(err instanceof Error) || texts.length === 0) return err;
  return { type: err.name, message: scrubSecrets(err.message, texts), ...(err.stack ? { stack: scrubSecrets(err.stack, texts) } : {}) };
}
