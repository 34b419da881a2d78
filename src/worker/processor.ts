import type { ImagesRepo, ModelRunDefaults } from '../core/images.js';
import { failure, type Failure } from '../core/failures.js';
import { scrubSecrets } from '../core/logger.js';
import type { ReportContext } from '../core/reporting.js';
import { eventTime, type JobEventSink, type StoredEvent } from '../core/job-events.js';
import type { GenerateParams, Generation, Progress } from '../engine/pipeline.js';
import type { Preview } from '../engine/preview.js';
import type { SchedulerName } from '../engine/schedulers/types.js';

/**
 * What a worker does with one job: claim the attempt, run the engine, store the PNG under the
 * attempt's own key, record the outcome. Collaborators are passed in, so tests can give other
 * ones.
 *
 * Every way an attempt can end, and what the job becomes:
 *   succeeded           the fenced update took this attempt's object (a newer attempt owning the
 *                       job makes it `superseded`, and this attempt removes its object)
 *   canceled            a user canceled it (seen at a progress write)
 *   superseded          another attempt owns the job (seen at a progress write)
 *   released            the worker is shutting down, or its engine went down: back to the queue,
 *                       not counted as a failed attempt; an engine that goes down twice on the
 *                       same job fails it as engine_crashed
 *   failed / retried    with a failure code (src/core/failures.ts); invalid_for_model and
 *                       out_of_memory are never retried, the others until attempts run out
 */

export interface ProcessorDeps {
  repo: ImagesRepo;
  storage: {
    /** Uploads and checks the upload (its digest and ETag); rejects on any failure. */
    putPng(key: string, png: Buffer, opts?: { signal?: AbortSignal }): Promise<unknown>;
    remove(key: string): Promise<void>;
    list(prefix: string): Promise<string[]>;
    /** An input picture's bytes (image-to-image, inpainting). */
    read(key: string): Promise<Buffer>;
  };
  engine: {
    generate(
      params: GenerateParams,
      run: { onProgress?: (p: Progress) => void; previewEvery?: number; signal?: AbortSignal; log?: EngineLog },
    ): Promise<Generation>;
  };
  /** Where the job's events go for live streams (status, progress, previews, outcome); nowhere when absent. */
  events?: JobEventSink;
  /**
   * Live previews from the engine's latent preview, at most one per `intervalMs`, encoded small
   * (src/engine/png.ts encodePreviewWebp). None when absent.
   */
  previews?: { intervalMs: number; encode(rgb: Uint8Array, width: number, height: number): Promise<{ data: Buffer; width: number; height: number }> };
  /** Where attempt `attempt` of a job stores its image `index` (0 unless the job makes several). */
  objectKeyFor(imageId: string, attempt: number, index?: number): string;
  workerId: string;
  modelName: string;
  /** What this worker's model fills in for parameters a job left to it (a model never served when the job was submitted). */
  runDefaults?: ModelRunDefaults;
  /** MAX_PIXEL_STEPS, checked again once those are filled in; no limit when absent. */
  maxPixelSteps?: number;
  /** Shortest interval between progress writes. */
  progressIntervalMs: number;
  /** An attempt running longer than this is aborted and recorded as timed_out. 0 = no limit. */
  jobTimeoutMs?: number;
  /** A job that takes the engine down this many times fails as engine_crashed. */
  maxEngineFailures?: number;
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
 * retry; `released` one handed back unfinished (shutdown or engine down).
 */
export type MetricOutcome = 'succeeded' | 'failed' | 'retried' | 'skipped' | 'superseded' | 'canceled' | 'released';

export interface JobMetrics {
  /** An attempt starts; the queue wait is given for first attempts only (later ones include backoff). */
  started(queueWaitSeconds?: number): void;
  step(seconds: number): void;
  finished(outcome: MetricOutcome, seconds: number): void;
}

/** A line from the engine thread about this job's generation. */
type EngineLog = (level: 'debug' | 'info' | 'warn', msg: string) => void;

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
 * Thrown when an attempt was handed back unfinished (worker shutdown, engine down): the queue
 * should run the job again without counting a failed attempt.
 */
export class JobReleasedError extends Error {
  // The queue adapter recognises the name (RELEASED_ERROR_NAME); the processor imports no queue code.
  override name = 'JobReleasedError';
}

/** An attempt that failed with a failure code; `final` when retrying cannot help. */
export class AttemptFailedError extends Error {
  override name = 'AttemptFailedError';
  constructor(
    readonly failure: Failure,
    readonly final: boolean,
    options: { cause?: unknown } = {},
  ) {
    super(`${failure.code}: ${failure.message}`, options);
  }
}

type StopReason = 'canceled' | 'superseded' | 'shutdown' | 'timed_out';

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
      const final =
        job.attempt >= job.maxAttempts || (err as Error | undefined)?.name === 'UnrecoverableError' || (err instanceof AttemptFailedError && err.final);
      const durationMs = Math.round(performance.now() - started);
      deps.metrics?.finished(final ? 'failed' : 'retried', durationMs / 1000);
      const cause = err instanceof AttemptFailedError ? err.cause : err;
      const code = err instanceof AttemptFailedError ? err.failure.code : undefined;
      job.log.error({ err: withoutTexts(cause ?? err, seen.secrets), code, outcome: final ? 'failed' : 'retrying', final, durationMs }, 'job attempt failed');
      deps.reporter?.capture(cause ?? err, {
        level: final ? 'error' : 'warning',
        tags: {
          jobId: job.jobId ?? job.imageId,
          imageId: job.imageId,
          attempt: job.attempt,
          maxAttempts: job.maxAttempts,
          final,
          code,
          model: deps.modelName,
          scheduler: seen.scheduler,
          workerId: deps.workerId,
        },
        redact: seen.secrets,
      });
      // The queue sees only the public text: BullMQ keeps it as the job's failedReason in Redis.
      if (err instanceof AttemptFailedError) throw final ? deps.unrecoverable(err.message) : new Error(err.message);
      throw err;
    }
  };
}

function createAttempt(deps: ProcessorDeps) {
  const maxEngineFailures = deps.maxEngineFailures ?? 2;
  const publish = (imageId: string, e: StoredEvent, at?: number) => void deps.events?.publish(imageId, e, at);

  /** Records a failed attempt and returns the error that tells the queue what to do. */
  const failed = async (job: JobInput, attempt: number, f: Failure, cause: unknown, neverRetry = false): Promise<AttemptFailedError> => {
    const final = neverRetry || job.attempt >= job.maxAttempts;
    const recorded = await deps.repo.fail(job.imageId, attempt, f, final).catch((err: unknown) => {
      job.log.error({ err }, 'could not record the failure');
      return false;
    });
    if (recorded) publish(job.imageId, final ? { type: 'failed', error: f } : { type: 'status', status: 'queued', attempt, error: f });
    return new AttemptFailedError(f, final, { cause });
  };

  return async function attemptJob(job: JobInput, seen: Seen): Promise<JobOutcome> {
    const { imageId, log } = job;
    const claimed = await deps.repo.startAttempt(imageId, deps.workerId, deps.runDefaults);
    if (!claimed) {
      // Canceled while its previous attempt's worker was gone: end it as canceled now.
      if (await deps.repo.finishCanceled(imageId)) {
        publish(imageId, { type: 'canceled' });
        log.info({ outcome: 'canceled' }, 'job was canceled before it could run');
        return 'canceled';
      }
      // Finished, failed or canceled already (a duplicate delivery or a late retry): nothing to do.
      log.info({}, 'job is no longer pending; skipping');
      return 'skipped';
    }
    const { record, attempt } = claimed;
    publish(imageId, { type: 'status', status: 'running', attempt });
    seen.scheduler = record.scheduler ?? undefined;
    // Prompts are user data: an error text that quotes one must not carry it to the error tracker.
    seen.secrets.push(record.prompt, ...(record.negativePrompt ? [record.negativePrompt] : []));
    const started = performance.now();
    const task = record.maskKey ? 'inpainting' : record.imageKey ? 'image-to-image' : 'text-to-image';
    log.info(
      { dbAttempt: attempt, model: deps.modelName, task, steps: record.numSteps, scheduler: record.scheduler, size: `${record.width}x${record.height}` },
      'generation started',
    );
    // The API checked the compute bound with the model's announced defaults; a job that left them
    // to this worker is checked now that they are filled in.
    if (deps.maxPixelSteps !== undefined && record.pixelSteps > deps.maxPixelSteps) {
      const detail = `width × height × num_steps is ${record.pixelSteps.toLocaleString('en-US')} with this model's defaults; this server allows at most ${deps.maxPixelSteps.toLocaleString('en-US')}.`;
      throw await failed(job, attempt, failure('invalid_for_model', detail), new Error(detail), true);
    }
    let inputs: { image: Buffer | null; mask: Buffer | null };
    try {
      inputs = {
        image: record.imageKey ? await deps.storage.read(record.imageKey) : null,
        mask: record.maskKey ? await deps.storage.read(record.maskKey) : null,
      };
    } catch (err) {
      throw await failed(job, attempt, failure('storage_unavailable'), err);
    }
    log.debug({ prompt: record.prompt, negativePrompt: record.negativePrompt }, 'prompt');

    // Stops the attempt: canceled by a user, taken over by another attempt, handed back because
    // this worker is shutting down, or past its deadline. The generation stops between steps;
    // an upload in flight is aborted.
    const stop = new AbortController();
    const stopFor = (reason: StopReason) => {
      if (!stop.signal.aborted) stop.abort(reason);
    };
    const onShutdown = () => stopFor('shutdown');
    if (job.signal?.aborted) onShutdown();
    job.signal?.addEventListener('abort', onShutdown, { once: true });
    const deadline = deps.jobTimeoutMs ? setTimeout(() => stopFor('timed_out'), deps.jobTimeoutMs) : undefined;
    const stopReason = () => stop.signal.reason as StopReason;

    // Progress goes to Postgres at most every progressIntervalMs (the textbook wrote every step),
    // one write at a time; the final 100 is written with the result.
    let lastWrite = Number.NEGATIVE_INFINITY;
    let writing: Promise<unknown> = Promise.resolve();
    let lastElapsedMs: number | undefined;
    let firstStepAt: number | undefined;
    let lastPreview = Number.NEGATIVE_INFINITY;
    const onProgress = (p: Progress) => {
      // Step time from the engine; without it, the gap since the previous step (the first one would include encoding).
      const stepMs = p.stepMs ?? (lastElapsedMs === undefined ? undefined : p.elapsedMs - lastElapsedMs);
      lastElapsedMs = p.elapsedMs;
      if (stepMs !== undefined) deps.metrics?.step(stepMs / 1000);
      if (deps.events) streamProgress(p);
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

    /** Every step to the job's live stream; a preview too when one is due. */
    const streamProgress = (p: Progress) => {
      const now = performance.now();
      // The mean step time since the first step: prompt encoding (before step 1) is not a step.
      firstStepAt ??= now - (p.stepMs ?? 0);
      const perStep = p.step > 0 ? (now - firstStepAt) / p.step : 0;
      publish(imageId, {
        type: 'progress',
        attempt,
        step: p.step,
        total: p.totalSteps,
        percent: Math.floor((p.step / p.totalSteps) * 100),
        eta_ms: Math.round(perStep * (p.totalSteps - p.step)),
      });
      const previews = deps.previews;
      if (!previews || !p.preview || p.step >= p.totalSteps || now - lastPreview < previews.intervalMs) return;
      lastPreview = now;
      // Encoded off the ordered path: progress events do not wait behind the WebP encoder. The
      // preview keeps the time of its step, and may arrive after the next step's progress.
      const at = eventTime();
      void previewEvent(p.preview, p, attempt, (rgb, w, h) => previews.encode(rgb, w, h), log).then((e) => e && publish(imageId, e, at));
    };

    try {
      let generation: Generation;
      try {
        generation = await deps.engine.generate(
          {
            prompt: record.prompt,
            negativePrompt: record.negativePrompt,
            // Null only when startAttempt had no defaults to fill in (then the engine's own apply).
            ...(record.numSteps !== null ? { numSteps: record.numSteps } : {}),
            ...(record.guidanceScale !== null ? { guidanceScale: record.guidanceScale } : {}),
            seed: record.seed,
            ...(record.width !== null ? { width: record.width } : {}),
            ...(record.height !== null ? { height: record.height } : {}),
            ...(record.scheduler !== null ? { scheduler: record.scheduler as SchedulerName } : {}),
            ...(record.numImages > 1 ? { numImages: record.numImages } : {}),
            ...(inputs.image ? { image: inputs.image } : {}),
            ...(inputs.mask ? { mask: inputs.mask } : {}),
            ...(record.strength !== null ? { strength: record.strength } : {}),
          },
          {
            onProgress,
            // The engine's latent preview costs a 4x3 matrix over the latents (no model run): ask for
            // it at every step and keep what the interval allows.
            ...(deps.previews && deps.events ? { previewEvery: 1 } : {}),
            // The engine thread's lines about this generation, with this job's id, attempt and worker on them.
            log: (level, msg) => logEngineLine(log, level, msg),
            signal: stop.signal,
          },
        );
      } catch (err) {
        await writing;
        const e = err as Error & { reason?: string; batchSize?: number };
        if (e.name === 'AbortError' && stop.signal.aborted) return await stopped(job, attempt, stopReason());
        if (e.name === 'InvalidParamsError') throw await failed(job, attempt, failure('invalid_for_model', e.message), err, true);
        // It shared a batch with whatever took the engine down, or had not reached it: not its fault.
        if (e.name === 'EngineDownError' && e.batchSize !== undefined && e.batchSize !== 1) return await engineDown(job, attempt, err, false);
        if (e.name === 'OutOfMemoryError' || (e.name === 'EngineDownError' && e.reason === 'out_of_memory')) {
          // The same request would exhaust the same worker again: not retried.
          throw await failed(job, attempt, failure('out_of_memory'), err, true);
        }
        if (e.name === 'EngineDownError') return await engineDown(job, attempt, err);
        throw await failed(job, attempt, failure('generation_failed'), err);
      }
      await writing;
      // A cancel, takeover or deadline seen at the last progress write still wins over storing the result.
      if (stop.signal.aborted && stopReason() !== 'shutdown') return await stopped(job, attempt, stopReason());

      // Image 0 is the one file_name names; the others of a job of several lie beside it.
      const pngs = [generation.png, ...(generation.more ?? []).map((m) => m.png)];
      const keys = pngs.map((_, k) => deps.objectKeyFor(imageId, attempt, k));
      const key = keys[0]!;
      try {
        for (const [k, png] of pngs.entries()) await deps.storage.putPng(keys[k]!, png, { signal: stop.signal });
      } catch (err) {
        await removeAll(keys, log);
        if (stop.signal.aborted && stopReason() !== 'shutdown') return await stopped(job, attempt, stopReason());
        throw await failed(job, attempt, failure('storage_unavailable'), err);
      }

      const ok = await deps.repo.succeed(imageId, attempt, { fileName: key, generationMs: generation.timings.totalMs, model: deps.modelName });
      const durationMs = Math.round(performance.now() - started);
      if (!ok) {
        // Another attempt owns the row now (this worker stalled past its lock): its result stands,
        // and this attempt's object must not outlive it.
        await removeAll(keys, log);
        log.warn({ dbAttempt: attempt, durationMs, outcome: 'superseded' }, 'job was taken over by another attempt; result discarded');
        return 'superseded';
      }
      publish(imageId, { type: 'succeeded' });
      // Earlier attempts of this job may have stored objects before they were taken over.
      if (attempt > 1) await removeOtherAttempts(imageId, keys, log);
      log.info({ dbAttempt: attempt, durationMs, seed: generation.seed, batchSize: generation.batchSize, outcome: 'succeeded' }, 'job succeeded');
      return 'succeeded';
    } finally {
      clearTimeout(deadline);
      job.signal?.removeEventListener('abort', onShutdown);
    }
  };

  async function removeOtherAttempts(imageId: string, keep: string[], log: JobLog): Promise<void> {
    const prefix = keep[0]!.slice(0, keep[0]!.lastIndexOf('/') + 1);
    try {
      for (const key of await deps.storage.list(prefix)) if (!keep.includes(key)) await deps.storage.remove(key);
    } catch (err) {
      log.warn({ err }, 'could not remove the objects of earlier attempts');
    }
  }

  /** An attempt's objects that must not outlive it (a failed upload of several, a superseded attempt). */
  async function removeAll(keys: string[], log: JobLog): Promise<void> {
    for (const key of keys) await deps.storage.remove(key).catch((err: unknown) => log.warn({ err }, 'could not remove an object of this attempt'));
  }

  /** Ends an attempt that was stopped between steps (or during its upload), as its reason says. */
  async function stopped(job: JobInput, attempt: number, reason: StopReason): Promise<JobOutcome> {
    switch (reason) {
      case 'canceled':
        if (await deps.repo.finishCanceled(job.imageId, attempt)) publish(job.imageId, { type: 'canceled' });
        job.log.info({ dbAttempt: attempt, outcome: 'canceled' }, 'job canceled between steps');
        return 'canceled';
      case 'superseded':
        await deps.repo.markSuperseded(job.imageId, attempt);
        job.log.warn({ dbAttempt: attempt, outcome: 'superseded' }, 'job was taken over by another attempt; stopped');
        return 'superseded';
      case 'timed_out': {
        const ms = deps.jobTimeoutMs ?? 0;
        const limit = ms >= 1000 ? `${Math.round(ms / 1000)} s` : `${ms} ms`;
        throw await failed(job, attempt, failure('timed_out', limit), new Error(`attempt aborted after ${ms} ms`));
      }
      case 'shutdown':
        if ((await deps.repo.release(job.imageId, attempt, 'shutdown')) === 'released') publish(job.imageId, { type: 'status', status: 'queued', attempt });
        throw new JobReleasedError('worker shutting down: job handed back to the queue');
    }
  }

  /** The engine went down under this attempt: hand the job back, unless it keeps doing that (`blamed`: it ran alone). */
  async function engineDown(job: JobInput, attempt: number, err: unknown, blamed = true): Promise<JobOutcome> {
    // Unblamed, it is released as at shutdown: not counted towards engine_crashed.
    const result = await deps.repo.release(job.imageId, attempt, blamed ? 'engine' : 'shutdown', maxEngineFailures);
    if (result === 'failed') {
      const f = failure('engine_crashed');
      publish(job.imageId, { type: 'failed', error: f });
      throw new AttemptFailedError(f, true, { cause: err });
    }
    if (result === 'not_owned') return 'superseded';
    publish(job.imageId, { type: 'status', status: 'queued', attempt });
    throw new JobReleasedError(`the engine went down (${(err as Error).message}): job handed back to the queue`);
  }
}

/** A preview event, encoded off the engine thread; null (skipped) if encoding fails. */
async function previewEvent(
  preview: Preview,
  p: Progress,
  attempt: number,
  encode: NonNullable<ProcessorDeps['previews']>['encode'],
  log: JobLog,
): Promise<StoredEvent | null> {
  try {
    const img = await encode(preview.rgb, preview.width, preview.height);
    return {
      type: 'preview',
      attempt,
      step: p.step,
      total: p.totalSteps,
      content_type: 'image/webp',
      width: img.width,
      height: img.height,
      data: img.data.toString('base64'),
    };
  } catch (err) {
    log.warn({ err }, 'could not encode a preview');
    return null;
  }
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
