import { createHash, randomUUID } from 'node:crypto';
import { randomSeed } from '../engine/random.js';
import { DependencyUnavailableError, IdempotencyConflictError, NotFoundError, QuotaExceededError, ServiceUnavailableError, ValidationError } from './errors.js';
import { IDEMPOTENCY_TTL_MS, requestFingerprint } from './idempotency.js';
import { jobParams, type PictureSize } from './job-params.js';
import type { JobEventSink } from './job-events.js';
import type { ModelCatalog } from './models.js';
import type { CreateImageBody } from './params.js';
import type { CreateResult, ImageObjects, ImageRecord, ImagesRepo, JobQueue, Quotas } from './images.js';

/**
 * Creating a job, the API's hot path, in the order that keeps every promise:
 *
 *   1. the model: the one the request names, or the default (src/core/models.ts); 400 when no
 *      worker serves it and it is not known;
 *   2. its parameters: the request's, else the model's defaults; checked against the model and
 *      the input pictures (src/core/job-params.ts); the compute bound (MAX_PIXEL_STEPS) on what
 *      the job will really run;
 *   3. the webhook URL, then back-pressure on the model's own queue;
 *   4. the row, under the tenant's lock with its quotas and Idempotency-Key (ImagesRepo.create);
 *   5. the input pictures, stored under the row's tenant and id; if storage fails, the row is
 *      discarded (never shown to anyone) and the client gets 503;
 *   6. the queue entry on the model's queue. If enqueueing fails after the commit, the row stays
 *      queued and the caller still gets its job: the workers' reconciler enqueues rows that have
 *      no job behind them, so nothing is lost and the client has no reason to submit twice.
 */

/** An uploaded picture, decoded once by the API to check it (src/core/uploads.ts). */
export interface InputPicture extends PictureSize {
  bytes: Buffer;
  contentType: string;
}

/** What a submission asks for beyond the generation parameters. */
export interface SubmitOptions {
  /** The client's Idempotency-Key, validated. */
  idempotencyKey?: string | undefined;
  /** Which route the body came to: the same key on another route is another request. */
  route: string;
  /** The webhook URL of the caller's API key, for a body that names none. */
  defaultWebhookUrl?: string | null | undefined;
  /** Image-to-image and inpainting: the uploaded picture and mask. */
  inputs?: { image?: InputPicture | undefined; mask?: InputPicture | undefined };
}

export interface SubmissionDeps {
  repo: ImagesRepo;
  queue: JobQueue;
  storage: Pick<ImageObjects, 'putInput' | 'remove'>;
  models: ModelCatalog;
  quotas(): Quotas;
  /** Past this many waiting jobs of a model, submissions for it get 503 with Retry-After. 0 = no limit. */
  maxQueueDepth?: number | undefined;
  /** Largest width x height x num_steps of one request (MAX_PIXEL_STEPS); no limit when absent. */
  maxPixelSteps?: number | undefined;
  log?: { warn: (obj: object, msg: string) => void } | undefined;
  events?: JobEventSink | undefined;
  /** Checks a webhook URL (src/core/ssrf.ts); absent: this server sends no webhooks. */
  checkWebhookUrl?: ((url: string) => Promise<void>) | undefined;
}

/** Where a job's uploaded picture or mask is stored: under its tenant, then its id, so no two tenants' inputs share a prefix. */
export function inputKeyFor(tenantId: string, imageId: string, part: 'image' | 'mask'): string {
  return `inputs/${tenantId}/${imageId}/${part}`;
}

/** How long a measured queue depth is trusted: one Redis round trip per second and model, not per POST. */
const DEPTH_CACHE_MS = 1_000;

export class Submission {
  private readonly depths = new Map<string, { value: number; at: number }>();

  constructor(private readonly deps: SubmissionDeps) {}

  /**
   * Creates the job, once per Idempotency-Key of the tenant: the same key and body (pictures
   * included) within 24 hours give back the job the first request created (`replayed`), another
   * body gets 422. `served` is false when the job waits for a worker of a known model.
   */
  async submit(tenantId: string, body: CreateImageBody, opts: SubmitOptions): Promise<{ record: ImageRecord; replayed: boolean; served: boolean }> {
    const { image, mask } = opts.inputs ?? {};
    const model = await this.deps.models.choose(body.model);
    const params = jobParams(body, model, { ...(image ? { image } : {}), ...(mask ? { mask } : {}) });
    const max = this.deps.maxPixelSteps;
    if (max !== undefined && params.cost > max) {
      throw new ValidationError([
        {
          field: '(body)',
          rule: 'max_pixel_steps',
          message: `width × height × num_steps (the model's defaults for what the request leaves out) is ${params.cost.toLocaleString('en-US')}; this server allows at most ${max.toLocaleString('en-US')} pixel-steps per request (512 × 512 × 50 is 13,107,200)`,
        },
      ]);
    }
    const webhookUrl = await this.webhookOf(body, opts);
    await this.checkBackPressure(model.id);
    const day = utcDay();
    // The same key with another picture is another request: the pictures' digests are part of it.
    const fingerprint =
      opts.idempotencyKey === undefined
        ? undefined
        : requestFingerprint(opts.route, { ...body, ...(image || mask ? { inputs: [digest(image), digest(mask)] } : {}) });
    const id = randomUUID();
    const keys = { image: image ? inputKeyFor(tenantId, id, 'image') : null, mask: mask ? inputKeyFor(tenantId, id, 'mask') : null };
    const created = await this.deps.repo.create(
      {
        id,
        tenantId,
        model: model.id,
        prompt: body.prompt,
        negativePrompt: body.negative_prompt,
        numSteps: params.numSteps,
        guidanceScale: params.guidanceScale,
        seed: body.seed ?? randomSeed(),
        width: params.width,
        height: params.height,
        scheduler: params.scheduler,
        strength: params.strength,
        pixelSteps: params.cost,
        numImages: body.num_images,
        webhookUrl,
        imageKey: keys.image,
        maskKey: keys.mask,
      },
      { ...this.deps.quotas(), dayStart: day.start },
      opts.idempotencyKey === undefined ? undefined : { key: opts.idempotencyKey, fingerprint: fingerprint!, ttlMs: IDEMPOTENCY_TTL_MS },
    );
    if ('existing' in created) {
      if (created.existing.fingerprint !== fingerprint) throw new IdempotencyConflictError();
      const record = await this.deps.repo.get(created.existing.imageId, tenantId);
      // Deleted since: as any unknown job.
      if (!record) throw new NotFoundError(`No generated image has the id "${created.existing.imageId}".`);
      return { record, replayed: true, served: model.served };
    }
    if ('exceeded' in created) throw quotaError(created, params.cost, day.next);
    await this.storeInputs(created.record, [
      [keys.image, image],
      [keys.mask, mask],
    ]);
    await this.enqueueNew(created.record);
    return { record: created.record, replayed: false, served: model.served };
  }

  /** The body's webhook URL, else the key's default, checked as a send will check it. */
  private async webhookOf(body: CreateImageBody, opts: SubmitOptions): Promise<string | null> {
    // The key's default applies when the body names none (it was checked when the key was made,
    // and is checked again at every send).
    const webhookUrl = body.webhook_url ?? opts.defaultWebhookUrl ?? null;
    if (body.webhook_url !== null) await this.checkWebhook(body.webhook_url);
    else if (webhookUrl !== null && !this.deps.checkWebhookUrl)
      throw new ValidationError([
        { field: 'webhook_url', rule: 'not_enabled', message: 'is not available: this server sends no webhooks (the API key has a default webhook URL)' },
      ]);
    return webhookUrl;
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

  /** Back-pressure per model: one model's backlog does not refuse another's requests. */
  private async checkBackPressure(model: string): Promise<void> {
    const max = this.deps.maxQueueDepth ?? 0;
    if (max <= 0) return;
    const now = performance.now();
    let cached = this.depths.get(model);
    if (!cached || now - cached.at > DEPTH_CACHE_MS) {
      let value: number;
      try {
        value = await this.deps.queue.depth(model);
      } catch {
        throw new ServiceUnavailableError('The job queue is unavailable. Please try again later.');
      }
      cached = { value, at: now };
      this.depths.set(model, cached);
    }
    if (cached.value >= max) {
      throw new ServiceUnavailableError(`The queue of model "${model}" is full (${cached.value} jobs waiting). Please try again later.`, 30);
    }
  }

  /** After the row is committed and before it is enqueued: no worker can look for the pictures yet. */
  private async storeInputs(record: ImageRecord, inputs: Array<[string | null, InputPicture | undefined]>): Promise<void> {
    const stored: string[] = [];
    try {
      for (const [key, picture] of inputs) {
        if (key === null || !picture) continue;
        await this.deps.storage.putInput(key, picture.bytes, picture.contentType);
        stored.push(key);
      }
    } catch (err) {
      this.deps.log?.warn({ err, imageId: record.id }, 'could not store the input pictures; the job is discarded');
      await this.deps.repo.discard(record.id);
      for (const key of stored) await this.deps.storage.remove(key).catch(() => undefined);
      throw new DependencyUnavailableError('storage', { cause: err });
    }
  }

  private async enqueueNew(record: ImageRecord): Promise<void> {
    // Logged before it is enqueued, so a worker's `running` can never come before it.
    await this.deps.events?.publish(record.id, { type: 'status', status: 'queued', attempt: 0 });
    try {
      await this.deps.queue.enqueue(record.model!, record.id, record.queuePriority);
    } catch (err) {
      this.deps.log?.warn({ err, imageId: record.id }, 'enqueue failed after the row was committed; the reconciler will enqueue it');
    }
  }
}

function digest(p: InputPicture | undefined): string | null {
  return p ? createHash('sha256').update(p.bytes).digest('hex') : null;
}

/** Start of the UTC day of `now`, and of the next one (when daily budgets reset). */
export function utcDay(now = new Date()): { start: Date; next: Date } {
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
  return { start, next: new Date(start.getTime() + 86_400_000) };
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
