import { randomUUID } from 'node:crypto';
import { IDEMPOTENCY_TTL_MS, requestFingerprint } from './idempotency.js';
import { randomSeed } from '../engine/random.js';
import { imageSeed } from '../engine/params.js';
import {
  ConflictError,
  IdempotencyConflictError,
  ImageNotAvailableError,
  NotFoundError,
  QuotaExceededError,
  ServiceUnavailableError,
  ValidationError,
} from './errors.js';
import type { Failure, FailureCode } from './failures.js';
import type { JobEventSink } from './job-events.js';
import { Batcher } from './batcher.js';
import { pixelSteps, type CreateImageBody } from './params.js';
import { decodeCursor, encodeCursor } from './cursor.js';

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
  /** Images the job makes (1..4); image k has seed + k (mod 2^32). */
  numImages: number;
  /** Where the job's outcome is POSTed; null for none. */
  webhookUrl: string | null;
}

export type NewImage = Pick<
  ImageRecord,
  'id' | 'tenantId' | 'prompt' | 'negativePrompt' | 'numSteps' | 'guidanceScale' | 'seed' | 'width' | 'height' | 'scheduler' | 'pixelSteps'
> &
  Partial<Pick<ImageRecord, 'numImages' | 'webhookUrl'>>;

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

/** An Idempotency-Key a submission claims: the tenant's key, what the request was, how long a key holds. */
export interface IdempotencyClaim {
  key: string;
  fingerprint: string;
  ttlMs: number;
}

/** What admitting a job gives: the job, or the limit that refused it. */
export type Admission = { record: ImageRecord } | { exceeded: 'in_flight' | 'daily_pixel_steps'; limit: number; used: number };

/** `create` with an Idempotency-Key may instead find the key live: the job it was used for. */
export type CreateResult = Admission | { existing: { fingerprint: string; imageId: string } };

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
   * priority = 1 + the tenant's jobs already in flight. With an Idempotency-Key, the key is
   * claimed in the same transaction first: a key of the tenant used within its time gives back
   * what it was used for instead (a replay is never refused for quota); an expired key is taken over.
   */
  create(data: NewImage, quota: Quotas, key?: IdempotencyClaim): Promise<CreateResult>;
  /**
   * `create` (without a key) for many jobs in one statement, one result per job in the same
   * order: each tenant's jobs are admitted in order while its limits allow (a job past a limit,
   * and the tenant's later ones in this batch, are refused).
   */
  createMany(data: NewImage[], quota: Quotas): Promise<Admission[]>;
  /** Deletes idempotency keys created before `before`; returns how many. */
  sweepIdempotencyKeys(before: Date): Promise<number>;
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
  /** Where job events go for live streams (src/core/job-events.ts); nowhere when absent. */
  events?: JobEventSink;
  /**
   * Checks a webhook URL as a send will (scheme, host, every address it resolves to); throws a
   * WebhookUrlError (src/core/ssrf.ts). Absent: this server sends no webhooks, and jobs asking
   * for one are refused.
   */
  checkWebhookUrl?: (url: string) => Promise<void>;
}

/** What a submission asks for beyond the generation parameters. */
export interface SubmitOptions {
  /** The client's Idempotency-Key, validated. */
  idempotencyKey?: string | undefined;
  /** Which route the body came to: the same key on another route is another request. */
  route: string;
  /** The webhook URL of the caller's API key, for a body that names none. */
  defaultWebhookUrl?: string | null | undefined;
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
  private readonly admission: Batcher<NewImage, Admission>;

  constructor(private readonly deps: ImagesServiceDeps) {
    this.admission = new Batcher((jobs) => this.admit(jobs), ADMISSION_BATCH_MAX);
  }

  /** Admits a batch (quotas checked, rows committed in one statement), then enqueues the admitted jobs. */
  private async admit(jobs: NewImage[]): Promise<Admission[]> {
    const results = await this.deps.repo.createMany(jobs, this.quotas());
    await this.enqueueAdmitted(results.flatMap((r) => ('record' in r ? [r.record] : [])));
    return results;
  }

  /**
   * After the rows are committed: their `queued` events, then one enqueue round trip. If
   * enqueueing fails, the rows stay queued and their callers still get their jobs: the workers'
   * reconciler enqueues rows that have no job behind them, so nothing is lost and no client has a
   * reason to submit twice.
   */
  private async enqueueAdmitted(records: ImageRecord[]): Promise<void> {
    if (records.length === 0) return;
    // Logged before they are enqueued, so a worker's `running` can never come before them.
    const events = this.deps.events;
    if (events) await Promise.all(records.map((r) => events.publish(r.id, { type: 'status', status: 'queued', attempt: 0 })));
    try {
      await this.deps.queue.enqueueMany(records.map((r) => ({ imageId: r.id, priority: r.queuePriority })));
    } catch (err) {
      this.deps.log?.warn({ err, jobs: records.length }, 'enqueue failed after the rows were committed; the reconciler will enqueue them');
    }
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
    return (await this.submit(tenantId, body, { route: 'generated-images' })).record;
  }

  /**
   * Validates what the schema cannot (compute budget, webhook URL), applies back-pressure and
   * the tenant's quotas, and creates the job, once per Idempotency-Key of the tenant: the same
   * key and body within 24 hours give back the job the first request created (`replayed`),
   * another body gets 422.
   */
  async submit(tenantId: string, body: CreateImageBody, opts: SubmitOptions): Promise<{ record: ImageRecord; replayed: boolean }> {
    const perImage = pixelSteps(body);
    // Each image is a generation of its own: the job is charged for all of them.
    const cost = perImage * body.num_images;
    const max = this.deps.maxPixelSteps;
    if (max !== undefined && perImage > max) {
      throw new ValidationError([
        {
          field: '(body)',
          rule: 'max_pixel_steps',
          message: `width × height × num_steps is ${perImage.toLocaleString('en-US')}; this server allows at most ${max.toLocaleString('en-US')} pixel-steps per request (512 × 512 × 50 is 13,107,200)`,
        },
      ]);
    }
    // The key's default applies when the body names none (it was checked when the key was made,
    // and is checked again at every send).
    const webhookUrl = body.webhook_url ?? opts.defaultWebhookUrl ?? null;
    if (body.webhook_url !== null) await this.checkWebhook(body.webhook_url);
    else if (webhookUrl !== null && !this.deps.checkWebhookUrl)
      throw new ValidationError([
        { field: 'webhook_url', rule: 'not_enabled', message: 'is not available: this server sends no webhooks (the API key has a default webhook URL)' },
      ]);
    await this.checkBackPressure();
    const fingerprint = opts.idempotencyKey === undefined ? undefined : requestFingerprint(opts.route, body);
    const job: NewImage = {
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
      numImages: body.num_images,
      webhookUrl,
    };
    // Without a key, the job is admitted with the submissions that arrived meanwhile (admit());
    // with one, on its own, the key claimed in the admitting transaction.
    const created =
      opts.idempotencyKey === undefined
        ? await this.admission.submit(job)
        : await this.deps.repo.create(job, this.quotas(), { key: opts.idempotencyKey, fingerprint: fingerprint!, ttlMs: IDEMPOTENCY_TTL_MS });
    if ('existing' in created) {
      if (created.existing.fingerprint !== fingerprint) throw new IdempotencyConflictError();
      return { record: await this.get(tenantId, created.existing.imageId), replayed: true };
    }
    if ('exceeded' in created) throw quotaError(created, cost, utcDay().next);
    if (opts.idempotencyKey !== undefined) await this.enqueueAdmitted([created.record]);
    return { record: created.record, replayed: false };
  }

  private async checkWebhook(url: string): Promise<void> {
    const check = this.deps.checkWebhookUrl;
    if (!check) throw new ValidationError([{ field: 'webhook_url', rule: 'not_enabled', message: 'is not available: this server sends no webhooks' }]);
    try {
      await check(url);
    } catch (err) {
      const e = err as { name?: string; rule?: string; message?: string };
      if (e.name !== 'WebhookUrlError') throw err;
      throw new ValidationError([{ field: 'webhook_url', rule: e.rule ?? 'url', message: e.message ?? 'is not allowed' }]);
    }
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
    if (after.status === 'canceled' && before.status !== 'canceled') void this.deps.events?.publish(id, { type: 'canceled' });
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

  /** What a finished job's `done` event (and its webhook) carries: its image URL, and every image's when it made several. */
  async result(record: ImageRecord): Promise<{ url: string; expires_at: string; images: Array<{ index: number; seed: number; url: string }> }> {
    const images = await this.urls(record.tenantId, record.id);
    return { url: images[0]!.url, expires_at: images[0]!.expiresAt.toISOString(), images: images.map(({ index, seed, url }) => ({ index, seed, url })) };
  }

  /** Presigned URLs of every image of the caller's succeeded job, image 0 first (errors as url()). */
  async urls(tenantId: string, id: string): Promise<Array<{ index: number; seed: number; url: string; expiresAt: Date }>> {
    const first = await this.url(tenantId, id);
    const record = await this.get(tenantId, id);
    const out = [{ index: 0, seed: record.seed, ...first }];
    for (let k = 1; k < record.numImages; k++) {
      const signed = await this.deps.storage.presignGet(siblingImageKey(record.fileName!, k));
      out.push({ index: k, seed: imageSeed(record.seed, k), ...signed });
    }
    return out;
  }

  async url(tenantId: string, id: string): Promise<{ url: string; expiresAt: Date }> {
    return this.deps.storage.presignGet((await this.imageObject(tenantId, id, 0)).key);
  }

  /**
   * Where image `index` of the caller's succeeded job is stored, and its seed (the web page reads
   * it through the API: its content-security policy allows no other host). The errors of url().
   */
  async imageObject(tenantId: string, id: string, index: number): Promise<{ key: string; seed: number }> {
    const record = await this.get(tenantId, id);
    switch (record.status) {
      case 'succeeded':
        if (!record.fileName) throw new Error(`image ${id} succeeded without a stored object`);
        if (!Number.isInteger(index) || index < 0 || index >= record.numImages) {
          throw new NotFoundError(`The job made ${record.numImages} image${record.numImages === 1 ? '' : 's'}: there is no image ${index}.`);
        }
        return { key: siblingImageKey(record.fileName, index), seed: imageSeed(record.seed, index) };
      case 'failed':
        throw new ImageNotAvailableError(`The image could not be generated: ${record.error ?? 'unknown error'}`, record.status, record.errorCode ?? 'internal');
      case 'canceled':
        throw new ImageNotAvailableError('The job was canceled; there is no image.', record.status);
      default:
        throw new ImageNotAvailableError('Image is not available yet. Please try again later.', record.status);
    }
  }
}

function quotaError(e: Extract<Admission, { exceeded: string }>, cost: number, nextDay: Date): QuotaExceededError {
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

/**
 * Where image k of a job of several is stored, from the key of image 0 (file_name): beside it,
 * `images/<id>/<attempt>-<k>.png` (src/adapters/storage.ts objectKeyFor makes the same names).
 */
export function siblingImageKey(fileName: string, index: number): string {
  return index === 0 ? fileName : fileName.replace(/\.png$/, `-${index}.png`);
}
