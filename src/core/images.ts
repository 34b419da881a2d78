import { randomUUID } from 'node:crypto';
import { randomSeed } from '../engine/random.js';
import { ConflictError, ImageNotAvailableError, NotFoundError, QuotaExceededError, ServiceUnavailableError, ValidationError } from './errors.js';
import type { Failure, FailureCode } from './failures.js';
import { Batcher } from './batcher.js';
import { pixelSteps, type CreateImageBody } from './params.js';

/**
 * The generated-images service: what the API does, free of HTTP, Prisma, BullMQ and S3, which
 * it reaches through the ports below (adapters in src/adapters implement them).
 */

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'canceled';

export interface ImageRecord {
  id: string;
  /** The tenant that owns the job: nothing about it is visible to any other. */
  tenantId: string;
  status: JobStatus;
  prompt: string;
  negativePrompt: string | null;
  numSteps: number;
  guidanceScale: number;
  seed: number;
  width: number;
  height: number;
  scheduler: string;
  progress: number;
  fileName: string | null;
  /** Why the job failed, or why its last attempt did; null otherwise. */
  errorCode: FailureCode | null;
  /** The public message for errorCode. */
  error: string | null;
  attempts: number;
  workerId: string | null;
  model: string | null;
  createdAt: Date;
  updatedAt: Date;
  startedAt: Date | null;
  finishedAt: Date | null;
  cancelRequestedAt: Date | null;
  generationMs: number | null;
  /** What the job was charged against the daily budget: width x height x num_steps. */
  pixelSteps: number;
  /** The BullMQ priority it is queued with (its rank among its tenant's jobs in flight). */
  queuePriority: number;
  /** When the job was deleted or expired; the API no longer shows it. */
  deletedAt: Date | null;
}

export type NewImage = Pick<
  ImageRecord,
  'id' | 'tenantId' | 'prompt' | 'negativePrompt' | 'numSteps' | 'guidanceScale' | 'seed' | 'width' | 'height' | 'scheduler' | 'pixelSteps'
>;

/** Per-tenant quotas (a tenant's own limits in its row win); 0 means no limit. */
export interface Quotas {
  /** Jobs queued or running at once. */
  maxInFlight: number;
  /** Pixel-steps per UTC day. */
  dailyPixelSteps: number;
}

export interface QuotaLimits extends Quotas {
  /** Start of the current UTC day: jobs created since count against today's budget. */
  dayStart: Date;
}

export type CreateResult = { record: ImageRecord } | { exceeded: 'in_flight' | 'daily_pixel_steps'; limit: number; used: number };

export interface TenantUsage {
  inFlight: number;
  pixelStepsToday: number;
  jobsToday: number;
  /** The limits that apply to this tenant (0 = none). */
  limits: Quotas;
}

/**
 * How an attempt ended (job_attempts.outcome): `retried` failed and goes back to the queue,
 * `released` was handed back unfinished (shutdown, or an engine that went down:
 * `engine_failed`), `superseded` lost the job to a newer attempt, `lost` was given up on by the
 * queue (its worker stopped responding).
 */
export type AttemptOutcome = 'succeeded' | 'failed' | 'retried' | 'released' | 'engine_failed' | 'superseded' | 'canceled' | 'lost';

export interface ImagesRepo {
  /**
   * Inserts the job unless the tenant is over a quota (checked and inserted under the tenant's
   * lock, so concurrent submissions on any API process cannot overshoot). The job is queued with
   * priority = 1 + the tenant's jobs already in flight.
   */
  create(data: NewImage, quota: QuotaLimits): Promise<CreateResult>;
  /**
   * `create` for many jobs in one statement, one result per job in the same order: each tenant's
   * jobs are admitted in order while its limits allow (a job past a limit, and the tenant's later
   * ones in this batch, are refused).
   */
  createMany(data: NewImage[], quota: Quotas): Promise<CreateResult[]>;
  /** With a tenant: only that tenant's job, and not a deleted one (the API's view). Without: any row (workers). */
  get(id: string, tenantId?: string): Promise<ImageRecord | null>;
  /** A tenant's jobs (not deleted), newest first, strictly older than `before` when given. */
  list(q: { tenantId: string; limit: number; before?: { createdAt: Date; id: string } }): Promise<ImageRecord[]>;
  usage(tenantId: string, defaults: QuotaLimits): Promise<TenantUsage>;
  /**
   * Deletes the job's content: blanks its prompts, marks it deleted, cancels it if queued and asks
   * a running attempt to stop. The row stays as a tombstone (tenant, size, pixel-steps, times).
   */
  markDeleted(id: string): Promise<boolean>;
  /** Forgets a deleted job's object name once its objects are gone. */
  clearObjects(id: string): Promise<void>;
  /** Live jobs that finished before the cutoff (the retention sweeper deletes them). */
  findExpired(q: { finishedBefore: Date; limit: number }): Promise<string[]>;
  /** Deleted jobs that still name an object (its removal failed or an attempt finished after the delete). */
  findDeletedWithObjects(q: { limit: number }): Promise<string[]>;
  /** Queued jobs whose priority is no longer their rank among their tenant's jobs in flight, with the rank. */
  unfairPriorities(limit: number): Promise<Array<{ id: string; priority: number }>>;
  setPriority(id: string, priority: number): Promise<void>;
  /** Claims the next attempt; null when the job is already finished or canceled. */
  startAttempt(id: string, workerId: string): Promise<{ record: ImageRecord; attempt: number } | null>;
  /**
   * Writes progress for the attempt that owns the job; says whether it still owns it and whether
   * someone asked to cancel (a running job learns of both at its next progress write).
   */
  setProgress(id: string, attempt: number, progress: number): Promise<{ owned: boolean; cancelRequested: boolean }>;
  /**
   * The fenced success: the row takes this attempt's object only if the attempt still owns it.
   * False when a newer attempt owns the job (this attempt is recorded as superseded).
   */
  succeed(id: string, attempt: number, result: { fileName: string; generationMs: number; model: string }): Promise<boolean>;
  /** `final` marks the job failed; otherwise it goes back to queued for the next attempt. */
  fail(id: string, attempt: number, failure: Failure, final: boolean): Promise<boolean>;
  /** Fails a queued or running job whatever its attempt (the queue gave up on it). */
  failAny(id: string, failure: Failure): Promise<boolean>;
  /** Records that an attempt stopped because a newer one owns the job. */
  markSuperseded(id: string, attempt: number): Promise<void>;
  /**
   * Asks for cancellation: a queued job becomes canceled at once; a running one is flagged and
   * its worker stops between steps. Null when the id is unknown; terminal jobs are unchanged.
   */
  requestCancel(id: string): Promise<ImageRecord | null>;
  /** Ends a job whose cancellation was requested and that no attempt is finishing. */
  finishCanceled(id: string, attempt?: number): Promise<boolean>;
  /**
   * Hands a running attempt back to the queue without counting it as failed: the worker is
   * shutting down (`shutdown`), or its engine went down (`engine`). An engine failure is counted;
   * the job fails as engine_crashed instead once it has taken the engine down `maxEngineFailures`
   * times. Says what happened to the row: released, failed, or not owned by this attempt.
   */
  release(id: string, attempt: number, cause: 'shutdown' | 'engine', maxEngineFailures?: number): Promise<'released' | 'failed' | 'not_owned'>;
  /** The attempts of a job, oldest first. */
  attempts(
    id: string,
  ): Promise<
    Array<{ attempt: number; workerId: string; outcome: AttemptOutcome | null; errorCode: FailureCode | null; startedAt: Date; finishedAt: Date | null }>
  >;
  /** Queued or running jobs not updated since the given times: candidates for the reconciler. */
  findStale(q: { queuedBefore: Date; runningBefore: Date; limit: number }): Promise<ImageRecord[]>;
  ping(): Promise<void>;
}

export interface JobQueue {
  /** Adds the job at a priority (1 runs first; equal priorities run in the order they were added). */
  enqueue(imageId: string, priority: number): Promise<void>;
  /** `enqueue` for many jobs in one round trip. */
  enqueueMany(jobs: Array<{ imageId: string; priority: number }>): Promise<void>;
  /** Removes a queued job no worker holds; false otherwise. */
  remove(imageId: string): Promise<boolean>;
  /** Jobs waiting to run (waiting + delayed + prioritized), for back-pressure. */
  depth(): Promise<number>;
}

export interface ImageObjects {
  presignGet(key: string): Promise<{ url: string; expiresAt: Date }>;
  /** Removes every object any attempt of the job stored. */
  removeImageObjects(imageId: string): Promise<void>;
}

export interface ImagesServiceDeps {
  repo: ImagesRepo;
  queue: JobQueue;
  storage: ImageObjects;
  /** Quotas of every tenant without limits of its own; none when absent. */
  quotas?: Quotas;
  /** Past this many waiting jobs, submissions get 503 with Retry-After. 0 = no limit. */
  maxQueueDepth?: number;
  /** Largest width x height x num_steps of one request (MAX_PIXEL_STEPS); no limit when absent. */
  maxPixelSteps?: number;
  log?: { warn: (obj: object, msg: string) => void };
}

/** Start of the UTC day of `now`, and of the next one (when daily budgets reset). */
export function utcDay(now = new Date()): { start: Date; next: Date } {
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
  return { start, next: new Date(start.getTime() + 86_400_000) };
}

/**
 * Deletes a job's content: the row becomes a tombstone without prompts, then every object of
 * the job is removed. If storage fails, the row still names its object and the retention
 * sweeper removes it later; the job is gone for its owner either way.
 */
export async function purgeImage(deps: { repo: ImagesRepo; storage: Pick<ImageObjects, 'removeImageObjects'> }, id: string): Promise<void> {
  await deps.repo.markDeleted(id);
  await deps.storage.removeImageObjects(id);
  await deps.repo.clearObjects(id);
}

/** How long a measured queue depth is trusted: one Redis round trip per second, not per POST. */
const DEPTH_CACHE_MS = 1_000;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Most jobs one admission statement and one enqueue round trip carry. Submissions that arrive
 * while a batch is being admitted go in the next one (core/batcher.ts), so a lone submission is
 * never delayed and a burst costs few round trips.
 */
const ADMISSION_BATCH_MAX = 256;

export class ImagesService {
  private depthCache: { value: number; at: number } | undefined;
  private readonly admission: Batcher<NewImage, CreateResult>;

  constructor(private readonly deps: ImagesServiceDeps) {
    this.admission = new Batcher((jobs) => this.admit(jobs), ADMISSION_BATCH_MAX);
  }

  /**
   * Admits a batch (quotas checked, rows committed in one statement), then enqueues the admitted
   * jobs in one round trip. If enqueueing fails after the commit, the rows stay queued and their
   * callers still get their jobs: the workers' reconciler enqueues rows that have no job behind
   * them, so nothing is lost and no client has a reason to submit twice.
   */
  private async admit(jobs: NewImage[]): Promise<CreateResult[]> {
    const results = await this.deps.repo.createMany(jobs, this.quotas());
    const admitted = results.flatMap((r) => ('record' in r ? [{ imageId: r.record.id, priority: r.record.queuePriority }] : []));
    if (admitted.length > 0) {
      try {
        await this.deps.queue.enqueueMany(admitted);
      } catch (err) {
        this.deps.log?.warn({ err, jobs: admitted.length }, 'enqueue failed after the rows were committed; the reconciler will enqueue them');
      }
    }
    return results;
  }

  private async checkBackPressure(): Promise<void> {
    const max = this.deps.maxQueueDepth ?? 0;
    if (max <= 0) return;
    const now = performance.now();
    if (!this.depthCache || now - this.depthCache.at > DEPTH_CACHE_MS) {
      let value: number;
      try {
        value = await this.deps.queue.depth();
      } catch {
        throw new ServiceUnavailableError('The job queue is unavailable. Please try again later.');
      }
      this.depthCache = { value, at: now };
    }
    if (this.depthCache.value >= max) {
      throw new ServiceUnavailableError(`The queue is full (${this.depthCache.value} jobs waiting). Please try again later.`, 30);
    }
  }

  /**
   * Admits the job (with the submissions that arrived meanwhile, see admit()): the row is
   * committed, and enqueued, before this resolves.
   */
  async create(tenantId: string, body: CreateImageBody): Promise<ImageRecord> {
    const cost = pixelSteps(body);
    const max = this.deps.maxPixelSteps;
    if (max !== undefined && cost > max) {
      throw new ValidationError([
        {
          field: '(body)',
          rule: 'max_pixel_steps',
          message: `width × height × num_steps is ${cost.toLocaleString('en-US')}; this server allows at most ${max.toLocaleString('en-US')} pixel-steps per request (512 × 512 × 50 is 13,107,200)`,
        },
      ]);
    }
    await this.checkBackPressure();
    const created = await this.admission.submit({
      id: randomUUID(),
      tenantId,
      prompt: body.prompt,
      negativePrompt: body.negative_prompt,
      numSteps: body.num_steps,
      guidanceScale: body.guidance_scale,
      seed: body.seed ?? randomSeed(),
      width: body.width,
      height: body.height,
      scheduler: body.scheduler,
      pixelSteps: cost,
    });
    if ('exceeded' in created) throw quotaError(created, cost, utcDay().next);
    const { record } = created;
    return record;
  }

  /**
   * Idempotent cancel: a queued job is canceled at once (and its queue entry removed), a running
   * one is flagged and stops between denoising steps. A job that already succeeded or failed
   * cannot be canceled (409).
   */
  async cancel(tenantId: string, id: string): Promise<ImageRecord> {
    const before = await this.get(tenantId, id);
    if (before.status === 'succeeded' || before.status === 'failed') {
      throw new ConflictError(`The job already ${before.status}; there is nothing to cancel.`);
    }
    const after = (await this.deps.repo.requestCancel(id)) ?? before;
    if (after.status === 'canceled') await this.deps.queue.remove(id).catch(() => false);
    return after;
  }

  /**
   * The caller's job. Another tenant's job, a deleted one and an unknown id all answer the same
   * 404, from the same single query, so nothing tells them apart.
   */
  async get(tenantId: string, id: string): Promise<ImageRecord> {
    const record = UUID.test(id) ? await this.deps.repo.get(id, tenantId) : null;
    if (!record) throw new NotFoundError(`No generated image has the id "${id}".`);
    return record;
  }

  /** Deletes the caller's job: its image objects and its prompts (the row stays as a tombstone for accounting). */
  async delete(tenantId: string, id: string): Promise<void> {
    const record = await this.get(tenantId, id);
    await purgeImage(this.deps, id);
    if (record.status === 'queued') await this.deps.queue.remove(id).catch(() => false);
  }

  async usage(tenantId: string): Promise<TenantUsage & { day: Date; resetsAt: Date }> {
    const day = utcDay();
    const usage = await this.deps.repo.usage(tenantId, { ...this.quotas(), dayStart: day.start });
    return { ...usage, day: day.start, resetsAt: day.next };
  }

  private quotas(): Quotas {
    return this.deps.quotas ?? { maxInFlight: 0, dailyPixelSteps: 0 };
  }

  async list(tenantId: string, limit: number, cursor?: string): Promise<{ items: ImageRecord[]; nextCursor: string | null }> {
    const before = cursor === undefined ? undefined : decodeCursor(cursor);
    const items = await this.deps.repo.list({ tenantId, limit, ...(before ? { before } : {}) });
    const last = items.at(-1);
    return { items, nextCursor: items.length === limit && last ? encodeCursor(last) : null };
  }

  async url(tenantId: string, id: string): Promise<{ url: string; expiresAt: Date }> {
    const record = await this.get(tenantId, id);
    switch (record.status) {
      case 'succeeded':
        if (!record.fileName) throw new Error(`image ${id} succeeded without a stored object`);
        return this.deps.storage.presignGet(record.fileName);
      case 'failed':
        throw new ImageNotAvailableError(`The image could not be generated: ${record.error ?? 'unknown error'}`, record.status, record.errorCode ?? 'internal');
      case 'canceled':
        throw new ImageNotAvailableError('The job was canceled; there is no image.', record.status);
      default:
        throw new ImageNotAvailableError('Image is not available yet. Please try again later.', record.status);
    }
  }
}

function quotaError(e: Extract<CreateResult, { exceeded: string }>, cost: number, nextDay: Date): QuotaExceededError {
  const n = (v: number) => v.toLocaleString('en-US');
  if (e.exceeded === 'in_flight') {
    return new QuotaExceededError(
      `You have ${n(e.used)} jobs queued or running, the most this account may have at once (${n(e.limit)}). Submit again when one of them finishes or is canceled.`,
      { quota: 'in_flight', limit: e.limit, used: e.used, resets_at: null },
      // No fixed reset: a slot frees when a job ends. A short wait is a reasonable next try.
      10,
    );
  }
  const retryAfter = Math.max(1, Math.ceil((nextDay.getTime() - Date.now()) / 1000));
  return new QuotaExceededError(
    `This job costs ${n(cost)} pixel-steps (width × height × num_steps), and ${n(e.used)} of today's ${n(e.limit)} are used. The budget resets at ${nextDay.toISOString()} (00:00 UTC).`,
    { quota: 'daily_pixel_steps', limit: e.limit, used: e.used, requested: cost, resets_at: nextDay.toISOString() },
    retryAfter,
  );
}

/** Opaque keyset cursor: the last item's creation time (microseconds are not kept by JS Dates) and id. */
export function encodeCursor(r: Pick<ImageRecord, 'createdAt' | 'id'>): string {
  return Buffer.from(`${r.createdAt.toISOString()}|${r.id}`).toString('base64url');
}

export function decodeCursor(cursor: string): { createdAt: Date; id: string } {
  const [iso, id] = Buffer.from(cursor, 'base64url').toString('utf8').split('|');
  const createdAt = new Date(iso ?? '');
  if (!id || !UUID.test(id) || Number.isNaN(createdAt.getTime())) {
    throw new ValidationError([{ field: 'cursor', rule: 'format', message: 'is not a cursor this API returned' }]);
  }
  return { createdAt, id };
}
