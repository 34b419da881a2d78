import { createHash, randomUUID } from 'node:crypto';
import { randomSeed } from '../engine/random.js';
import { Batcher } from './batcher.js';
import { DependencyUnavailableError, IdempotencyConflictError, NotFoundError, QuotaExceededError, ServiceUnavailableError, ValidationError } from './errors.js';
import { IDEMPOTENCY_TTL_MS, requestFingerprint } from './idempotency.js';
import { jobParams, type PictureSize } from './job-params.js';
import type { JobEventSink } from './job-events.js';
import type { ModelCatalog } from './models.js';
import type { CreateImageBody } from './params.js';
import type { Admission, ImageObjects, ImageRecord, ImagesRepo, JobQueue, NewImage, Quotas } from './images.js';

/**
 * Creating a job, the API's hot path, in the order that keeps every promise:
 *
 *   1. the model: the one the request names, or the default (src/core/models.ts); 400 when no
 *      worker serves it and it is not known;
 *   2. its parameters: the request's, else the model's defaults; checked against the model and
 *      the input pictures (src/core/job-params.ts); the compute bound (MAX_PIXEL_STEPS) on what
 *      the job will really run;
 *   3. the webhook URL, then back-pressure on the model's own queue;
 *   4. the row, admitted against the tenant's quotas in one statement: with the submissions that
 *      arrived meanwhile (ImagesRepo.createMany, one statement and one enqueue round trip per
 *      model for a whole batch), or on its own with its Idempotency-Key claimed in the same
 *      transaction, or on its own when it carries input pictures (ImagesRepo.create);
 *   5. the input pictures, stored under the row's tenant and id; if storage fails, the row is
 *      discarded (never shown to anyone) and the client gets 503;
 *   6. its `queued` event, then the queue entry on the model's queue. If enqueueing fails after
 *      the commit, the row stays queued and the caller still gets its job: the workers'
 *      reconciler enqueues rows that have no job behind them, so nothing is lost and the client
 *      has no reason to submit twice.
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

/**
 * Most jobs one admission statement carries. Submissions that arrive while a batch is being
 * admitted go in the next one (core/batcher.ts), so a lone submission is never delayed and a
 * burst costs few round trips.
 */
const ADMISSION_BATCH_MAX = 256;

export class Submission {
  private readonly depths = new Map<string, { value: number; at: number }>();
  private readonly admission: Batcher<NewImage, Admission>;

  constructor(private readonly deps: SubmissionDeps) {
    this.admission = new Batcher((jobs) => this.admit(jobs), ADMISSION_BATCH_MAX);
  }

  /** Admits a batch (quotas checked, rows committed in one statement), then enqueues the admitted jobs. */
  private async admit(jobs: NewImage[]): Promise<Admission[]> {
    const results = await this.deps.repo.createMany(jobs, this.deps.quotas());
    await this.enqueueAdmitted(results.flatMap((r) => ('record' in r ? [r.record] : [])));
    return results;
  }

  /**
   * Creates the job, once per Idempotency-Key of the tenant: the same key and body (pictures
   * included) within 24 hours give back the job the first request created (`replayed`), another
   * body gets 422. `served` is false when the job waits for a worker of a known model.
   */
  async submit(tenantId: string, body: CreateImageBody, opts: SubmitOptions): Promise<{ record: ImageRecord; replayed: boolean; served: boolean }> {
    const { image, mask } = opts.inputs ?? {};
    const model = await this.deps.models.choose(body.model);
    const params = jobParams(body, model, { ...(image ? { image } : {}), ...(mask ? { mask } : {}) });
    // Each image is a generation of its own: the job is charged for all of them, and the compute
    // bound holds for each.
    const cost = params.cost * body.num_images;
    const max = this.deps.maxPixelSteps;
    if (max !== undefined && params.cost > max) {
      throw new ValidationError([
        {
          field: '(body)',
          rule: 'max_pixel_steps',
          message: `width × height × num_steps is ${params.cost.toLocaleString('en-US')}; this server allows at most ${max.toLocaleString('en-US')} pixel-steps per request (512 × 512 × 50 is 13,107,200; what the request leaves out counts at the model's default)`,
        },
      ]);
    }
    const webhookUrl = await this.webhookOf(body, opts);
    await this.checkBackPressure(model.id);
    // The same key with another picture is another request: the pictures' digests are part of it.
    const fingerprint =
      opts.idempotencyKey === undefined
        ? undefined
        : requestFingerprint(opts.route, { ...body, ...(image || mask ? { inputs: [digest(image), digest(mask)] } : {}) });
    const id = randomUUID();
    const keys = { image: image ? inputKeyFor(tenantId, id, 'image') : null, mask: mask ? inputKeyFor(tenantId, id, 'mask') : null };
    const job: NewImage = {
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
      pixelSteps: cost,
      numImages: body.num_images,
      webhookUrl,
      imageKey: keys.image,
      maskKey: keys.mask,
    };
    // A plain job is admitted with the submissions that arrived meanwhile, and enqueued with them
    // (admit()). One with an Idempotency-Key is admitted on its own, the key claimed in the
    // admitting transaction; one with pictures on its own too, as its pictures are stored between
    // the commit and the enqueue.
    const alone = opts.idempotencyKey !== undefined || image !== undefined || mask !== undefined;
    const created = !alone
      ? await this.admission.submit(job)
      : await this.deps.repo.create(
          job,
          this.deps.quotas(),
          opts.idempotencyKey === undefined ? undefined : { key: opts.idempotencyKey, fingerprint: fingerprint!, ttlMs: IDEMPOTENCY_TTL_MS },
        );
    if ('existing' in created) {
      if (created.existing.fingerprint !== fingerprint) throw new IdempotencyConflictError();
      const record = await this.deps.repo.get(created.existing.imageId, tenantId);
      // Deleted since: as any unknown job.
      if (!record) throw new NotFoundError(`No generated image has the id "${created.existing.imageId}".`);
      return { record, replayed: true, served: model.served };
    }
    if ('exceeded' in created) throw quotaError(created, cost, utcDay().next);
    if (alone) {
      await this.storeInputs(created.record, [
        [keys.image, image],
        [keys.mask, mask],
      ]);
      await this.enqueueAdmitted([created.record]);
    }
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

  /**
   * After the rows are committed: their `queued` events, then one enqueue round trip per model
   * (each has its own queue). If enqueueing fails, the rows stay queued and their callers still
   * get their jobs: the workers' reconciler enqueues rows that have no job behind them, so
   * nothing is lost and no client has a reason to submit twice.
   */
  private async enqueueAdmitted(records: ImageRecord[]): Promise<void> {
    if (records.length === 0) return;
    // Logged before they are enqueued, so a worker's `running` can never come before them.
    const events = this.deps.events;
    if (events) await Promise.all(records.map((r) => events.publish(r.id, { type: 'status', status: 'queued', attempt: 0 })));
    const byModel = new Map<string, ImageRecord[]>();
    for (const r of records) byModel.set(r.model!, [...(byModel.get(r.model!) ?? []), r]);
    await Promise.all(
      [...byModel].map(async ([model, rs]) => {
        try {
          await this.deps.queue.enqueueMany(
            model,
            rs.map((r) => ({ imageId: r.id, priority: r.queuePriority })),
          );
        } catch (err) {
          this.deps.log?.warn({ err, model, jobs: rs.length }, 'enqueue failed after the rows were committed; the reconciler will enqueue them');
        }
      }),
    );
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
