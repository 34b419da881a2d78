import { Prisma, type Db, type GeneratedImage } from './db/client.js';
import { translateDbError } from './db/errors.js';
import { translateErrors } from './translate.js';
import type { AttemptOutcome, CreateResult, IdempotencyClaim, ImageRecord, ImagesRepo, NewImage, QuotaLimits } from '../core/images.js';
import { failure, isFailureCode, type Failure } from '../core/failures.js';

/**
 * The generated_images and job_attempts tables through Prisma. Updates a worker makes while it
 * owns an attempt are fenced on `attempts`: startAttempt increments it (and opens the attempt's
 * job_attempts row) and every later write matches on it, so a worker whose job was taken over
 * (it stalled, its lock expired, another worker started attempt n+1) changes nothing. Each
 * terminal write closes the attempt's row in the same statement, so the attempt log and the job
 * never disagree.
 */

function toRecord(row: GeneratedImage): ImageRecord {
  return {
    id: row.id,
    tenantId: row.tenantId,
    status: row.status,
    prompt: row.prompt,
    negativePrompt: row.negativePrompt,
    numSteps: row.numSteps,
    guidanceScale: row.guidanceScale,
    seed: Number(row.seed),
    width: row.width,
    height: row.height,
    scheduler: row.scheduler,
    progress: row.progress,
    fileName: row.fileName,
    errorCode: isFailureCode(row.errorCode) ? row.errorCode : row.errorCode === null ? null : 'internal',
    error: row.error,
    attempts: row.attempts,
    workerId: row.workerId,
    model: row.model,
    createdAt: row.createdAt,
    updatedAt: row.updatedAt,
    startedAt: row.startedAt,
    finishedAt: row.finishedAt,
    cancelRequestedAt: row.cancelRequestedAt,
    generationMs: row.generationMs,
    numImages: row.numImages,
    webhookUrl: row.webhookUrl,
    imageKey: row.imageKey,
    maskKey: row.maskKey,
    strength: row.strength,
    pixelSteps: Number(row.pixelSteps),
    queuePriority: row.queuePriority,
    deletedAt: row.deletedAt,
  };
}

/** BullMQ's lowest priority (PRIORITY_LIMIT); priorities are ranks, capped here. */
const MAX_PRIORITY = 2 ** 21 - 1;

/**
 * What counts against a tenant's quotas, from its rows: jobs queued or running, and the
 * pixel-steps of jobs created since `dayStart`, except those canceled before any attempt began
 * (they used nothing). Deleted jobs still count: their rows stay as tombstones for this.
 */
const usageOf = (tenantId: string, dayStart: Date, model: string | null = null) => Prisma.sql`
  SELECT count(*) FILTER (WHERE status IN ('queued', 'running'))::int AS in_flight,
         count(*) FILTER (WHERE status IN ('queued', 'running') AND model IS NOT DISTINCT FROM ${model})::int AS in_flight_model,
         COALESCE(sum(pixel_steps) FILTER (WHERE created_at >= ${dayStart} AND NOT (status = 'canceled' AND attempts = 0)), 0)::bigint AS used,
         count(*) FILTER (WHERE created_at >= ${dayStart})::int AS jobs
    FROM generated_images
   WHERE tenant_id = ${tenantId}::uuid AND (status IN ('queued', 'running') OR created_at >= ${dayStart})`;

type UsageRow = { in_flight: number; in_flight_model: number; used: bigint; jobs: number };
const NO_DAY = new Date('9999-12-31T00:00:00Z');
type LimitsRow = { max_in_flight: number | null; daily_pixel_steps: bigint | null };

/** A tenant's own limit where set, else the configured default (0 = none). */
function limitsOf(row: LimitsRow | undefined, defaults: Pick<QuotaLimits, 'maxInFlight' | 'dailyPixelSteps'>) {
  return {
    maxInFlight: row?.max_in_flight ?? defaults.maxInFlight,
    dailyPixelSteps: row?.daily_pixel_steps === null || row?.daily_pixel_steps === undefined ? defaults.dailyPixelSteps : Number(row.daily_pixel_steps),
  };
}

export function createImagesRepo(db: Db): ImagesRepo {
  /** Closes an attempt's row with its outcome, unless it was closed already. */
  const closeAttempt = (id: string, attempt: number, outcome: AttemptOutcome, errorCode: string | null = null) => db.$executeRaw`
        UPDATE job_attempts SET outcome = ${outcome}, error_code = ${errorCode}, finished_at = now()
         WHERE image_id = ${id}::uuid AND attempt = ${attempt} AND outcome IS NULL`;

  const repo: ImagesRepo = {
    async create(data: NewImage, quota: QuotaLimits, key?: IdempotencyClaim) {
      // The tenant's row lock serializes its submissions across every API process, so two
      // requests can never both take the last slot or the last of the budget, nor both claim
      // one Idempotency-Key.
      return db.$transaction(async (tx): Promise<CreateResult> => {
        const tenant = await tx.$queryRaw<LimitsRow[]>`
          SELECT max_in_flight, daily_pixel_steps FROM tenants WHERE id = ${data.tenantId}::uuid FOR UPDATE`;
        if (!tenant[0]) throw new Error(`tenant ${data.tenantId} does not exist`);
        if (key) {
          // A live key gives back what it was used for, whatever the quotas say now.
          const [live] = await tx.$queryRaw<Array<{ fingerprint: string; image_id: string }>>`
            SELECT fingerprint, image_id::text FROM idempotency_keys
             WHERE tenant_id = ${data.tenantId}::uuid AND key = ${key.key}
               AND created_at >= now() - make_interval(secs => ${key.ttlMs / 1000})`;
          if (live) return { existing: { fingerprint: live.fingerprint, imageId: live.image_id } };
        }
        const limits = limitsOf(tenant[0], quota);
        // Without a budget, today's jobs need not be summed (a busy tenant has many): counting from
        // a day that never comes leaves only the jobs in flight, which the priority needs.
        const since = limits.dailyPixelSteps > 0 ? quota.dayStart : NO_DAY;
        const [u] = await tx.$queryRaw<UsageRow[]>(usageOf(data.tenantId, since, data.model));
        const inFlight = u?.in_flight ?? 0;
        const used = Number(u?.used ?? 0);
        if (limits.maxInFlight > 0 && inFlight >= limits.maxInFlight) return { exceeded: 'in_flight' as const, limit: limits.maxInFlight, used: inFlight };
        if (limits.dailyPixelSteps > 0 && used + data.pixelSteps > limits.dailyPixelSteps) {
          return { exceeded: 'daily_pixel_steps' as const, limit: limits.dailyPixelSteps, used };
        }
        if (key) {
          // No live key (checked under the lock): a new one, or an expired one taken over.
          await tx.$executeRaw`
            INSERT INTO idempotency_keys (tenant_id, key, fingerprint, image_id) VALUES (${data.tenantId}::uuid, ${key.key}, ${key.fingerprint}, ${data.id}::uuid)
            ON CONFLICT (tenant_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, image_id = EXCLUDED.image_id, created_at = now()`;
        }
        const row = await tx.generatedImage.create({
          data: {
            id: data.id,
            tenantId: data.tenantId,
            prompt: data.prompt,
            negativePrompt: data.negativePrompt,
            numSteps: data.numSteps,
            guidanceScale: data.guidanceScale,
            seed: BigInt(data.seed),
            width: data.width,
            height: data.height,
            scheduler: data.scheduler,
            pixelSteps: BigInt(data.pixelSteps),
            model: data.model,
            // Its rank among the tenant's jobs in flight on its model (each model has its own
            // queue): the tenant's k-th job waits behind every other tenant's (k-1)-th, not
            // behind whole backlogs.
            queuePriority: Math.min((u?.in_flight_model ?? 0) + 1, MAX_PRIORITY),
            numImages: data.numImages ?? 1,
            webhookUrl: data.webhookUrl ?? null,
            imageKey: data.imageKey ?? null,
            maskKey: data.maskKey ?? null,
            strength: data.strength ?? null,
          },
        });
        return { record: toRecord(row) };
      });
    },

    async sweepIdempotencyKeys(before) {
      return (await db.idempotencyKey.deleteMany({ where: { createdAt: { lt: before } } })).count;
    },

    async get(id, tenantId) {
      const row =
        tenantId === undefined
          ? await db.generatedImage.findUnique({ where: { id } })
          : await db.generatedImage.findFirst({ where: { id, tenantId, deletedAt: null } });
      return row ? toRecord(row) : null;
    },

    async list({ tenantId, limit, before }) {
      const rows = await db.generatedImage.findMany({
        where: {
          tenantId,
          deletedAt: null,
          ...(before ? { OR: [{ createdAt: { lt: before.createdAt } }, { createdAt: before.createdAt, id: { lt: before.id } }] } : {}),
        },
        orderBy: [{ createdAt: 'desc' }, { id: 'desc' }],
        take: limit,
      });
      return rows.map(toRecord);
    },

    async usage(tenantId, defaults) {
      const [tenant] = await db.$queryRaw<LimitsRow[]>`SELECT max_in_flight, daily_pixel_steps FROM tenants WHERE id = ${tenantId}::uuid`;
      const [u] = await db.$queryRaw<UsageRow[]>(usageOf(tenantId, defaults.dayStart));
      return { inFlight: u?.in_flight ?? 0, pixelStepsToday: Number(u?.used ?? 0), jobsToday: u?.jobs ?? 0, limits: limitsOf(tenant, defaults) };
    },

    async markDeleted(id) {
      // Prompts go now; a queued job is canceled and a running one told to stop. file_name and the
      // input keys stay until the objects are removed (clearObjects), so a removal that fails is
      // retried by the sweeper.
      const rows = await db.$queryRaw<Array<{ image_key: string | null; mask_key: string | null }>>`
        UPDATE generated_images
           SET deleted_at = COALESCE(deleted_at, now()), prompt = '', negative_prompt = NULL,
               cancel_requested_at = CASE WHEN status IN ('queued', 'running') THEN COALESCE(cancel_requested_at, now()) ELSE cancel_requested_at END,
               status = CASE WHEN status = 'queued' THEN 'canceled'::job_status ELSE status END,
               finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
               updated_at = now()
         WHERE id = ${id}::uuid
     RETURNING image_key, mask_key`;
      const row = rows[0];
      return row ? [row.image_key, row.mask_key].filter((k): k is string => k !== null) : null;
    },

    async clearObjects(id) {
      await db.generatedImage.updateMany({ where: { id, deletedAt: { not: null } }, data: { fileName: null, imageKey: null, maskKey: null } });
    },

    async discard(id) {
      // Never shown to its client (its inputs could not be stored): gone as if never submitted,
      // its Idempotency-Key with it, so a retry creates the job anew.
      await db.$transaction([db.idempotencyKey.deleteMany({ where: { imageId: id } }), db.generatedImage.deleteMany({ where: { id, attempts: 0 } })]);
    },

    async assignModel(id, model) {
      const r = await db.generatedImage.updateMany({ where: { id, model: null, status: { in: ['queued', 'running'] } }, data: { model } });
      return r.count === 1;
    },

    async findExpired({ finishedBefore, limit }) {
      const rows = await db.generatedImage.findMany({
        where: { deletedAt: null, finishedAt: { lt: finishedBefore }, status: { in: ['succeeded', 'failed', 'canceled'] } },
        orderBy: { finishedAt: 'asc' },
        take: limit,
        select: { id: true },
      });
      return rows.map((r) => r.id);
    },

    async findDeletedWithObjects({ limit }) {
      const rows = await db.generatedImage.findMany({
        where: { deletedAt: { not: null }, OR: [{ fileName: { not: null } }, { imageKey: { not: null } }, { maskKey: { not: null } }] },
        orderBy: { deletedAt: 'asc' },
        take: limit,
        select: { id: true },
      });
      return rows.map((r) => r.id);
    },

    async unfairPriorities(limit) {
      // Each queued job's rank among its tenant's jobs in flight on its model (running ones
      // first, then by age), where it differs from the priority it was queued with. Jobs of
      // different models wait in different queues, so ranks are counted per model.
      const rows = await db.$queryRaw<Array<{ id: string; rank: bigint; model: string | null }>>`
        SELECT id, rank, model FROM (
          SELECT id, status, queue_priority, model,
                 row_number() OVER (PARTITION BY tenant_id, model ORDER BY (status = 'running') DESC, created_at, id) AS rank
            FROM generated_images WHERE status IN ('queued', 'running')) ranked
         WHERE status = 'queued' AND queue_priority <> LEAST(rank, ${MAX_PRIORITY}) AND model IS NOT NULL
         ORDER BY rank LIMIT ${limit}`;
      return rows.map((r) => ({ id: r.id, model: r.model!, priority: Math.min(Number(r.rank), MAX_PRIORITY) }));
    },

    async setPriority(id, priority) {
      await db.generatedImage.updateMany({ where: { id, status: 'queued' }, data: { queuePriority: priority } });
    },

    async startAttempt(id, workerId, d) {
      // One statement, so two workers can never both believe they own the same attempt, and the
      // attempt's row exists from the moment it does. Parameters the job left to its model (a
      // model never served when it was submitted) take this worker's defaults, and the charge
      // is corrected to them (the right-hand sides read the row as it was).
      const started = await db.$queryRaw<Array<{ attempts: number }>>`
        WITH claimed AS (
          UPDATE generated_images
             SET status = 'running', attempts = attempts + 1, progress = 0, worker_id = ${workerId},
                 started_at = now(), updated_at = now(), error = NULL, error_code = NULL,
                 num_steps = COALESCE(num_steps, ${d?.numSteps ?? null}::int),
                 guidance_scale = COALESCE(guidance_scale, ${d?.guidanceScale ?? null}::float8),
                 width = COALESCE(width, ${d?.width ?? null}::int),
                 height = COALESCE(height, ${d?.height ?? null}::int),
                 scheduler = COALESCE(scheduler, ${d?.scheduler ?? null}::text),
                 pixel_steps = CASE WHEN num_steps IS NULL OR width IS NULL OR height IS NULL
                                    THEN COALESCE(COALESCE(width, ${d?.width ?? null}::int)::bigint * COALESCE(height, ${d?.height ?? null}::int) * COALESCE(num_steps, ${d?.numSteps ?? null}::int), pixel_steps)
                                    ELSE pixel_steps END
           WHERE id = ${id}::uuid AND status IN ('queued', 'running') AND cancel_requested_at IS NULL
       RETURNING id, attempts),
        opened AS (
          INSERT INTO job_attempts (image_id, attempt, worker_id) SELECT id, attempts, ${workerId} FROM claimed)
        SELECT attempts FROM claimed`;
      const attempt = started[0]?.attempts;
      if (attempt === undefined) return null;
      const row = await db.generatedImage.findUnique({ where: { id } });
      return row ? { record: toRecord(row), attempt } : null;
    },

    async setProgress(id, attempt, progress) {
      const rows = await db.$queryRaw<Array<{ cancel: boolean }>>`
        UPDATE generated_images SET progress = ${progress}, updated_at = now()
         WHERE id = ${id}::uuid AND attempts = ${attempt} AND status = 'running'
     RETURNING cancel_requested_at IS NOT NULL AS cancel`;
      const row = rows[0];
      return { owned: row !== undefined, cancelRequested: row?.cancel ?? false };
    },

    async succeed(id, attempt, result) {
      // The row and the attempt in one statement: the attempt is `succeeded` exactly when the
      // row took its object, else `superseded`.
      const rows = await db.$queryRaw<Array<{ outcome: string }>>`
        WITH won AS (
          UPDATE generated_images
             SET status = 'succeeded', progress = 100, file_name = ${result.fileName},
                 generation_ms = ${Math.round(result.generationMs)}, model = ${result.model},
                 finished_at = now(), updated_at = now(), error = NULL, error_code = NULL
           WHERE id = ${id}::uuid AND attempts = ${attempt} AND status = 'running'
       RETURNING id)
        UPDATE job_attempts
           SET outcome = CASE WHEN EXISTS (SELECT 1 FROM won) THEN 'succeeded' ELSE 'superseded' END, finished_at = now()
         WHERE image_id = ${id}::uuid AND attempt = ${attempt} AND outcome IS NULL
     RETURNING outcome`;
      if (rows[0]) return rows[0].outcome === 'succeeded';
      // The attempt row was closed already (should not happen); the job row decides.
      const row = await db.generatedImage.findUnique({ where: { id }, select: { status: true, attempts: true, fileName: true } });
      return row?.status === 'succeeded' && row.attempts === attempt && row.fileName === result.fileName;
    },

    async fail(id, attempt, f: Failure, final) {
      // A failure that will be retried puts the row back in the queue, with the reason kept.
      const r = await db.generatedImage.updateMany({
        where: { id, attempts: attempt, status: 'running' },
        data: final
          ? { status: 'failed', errorCode: f.code, error: f.message, finishedAt: new Date() }
          : { status: 'queued', errorCode: f.code, error: f.message, progress: 0 },
      });
      await closeAttempt(id, attempt, r.count === 1 ? (final ? 'failed' : 'retried') : 'superseded', f.code);
      return r.count === 1;
    },

    async failAny(id, f) {
      const rows = await db.$queryRaw<Array<{ attempts: number }>>`
        UPDATE generated_images SET status = 'failed', error_code = ${f.code}, error = ${f.message}, finished_at = now(), updated_at = now()
         WHERE id = ${id}::uuid AND status IN ('queued', 'running')
     RETURNING attempts`;
      const attempt = rows[0]?.attempts;
      if (attempt === undefined) return false;
      await closeAttempt(id, attempt, 'lost', f.code);
      return true;
    },

    async markSuperseded(id, attempt) {
      await closeAttempt(id, attempt, 'superseded');
    },

    async requestCancel(id) {
      // One statement: a worker claiming the job at the same moment either sees the flag (and
      // does not start) or has already claimed it (and stops at its next progress write).
      await db.$executeRaw`
        UPDATE generated_images
           SET cancel_requested_at = COALESCE(cancel_requested_at, now()),
               status = CASE WHEN status = 'queued' THEN 'canceled'::job_status ELSE status END,
               finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
               updated_at = now()
         WHERE id = ${id}::uuid AND status IN ('queued', 'running')`;
      const row = await db.generatedImage.findUnique({ where: { id } });
      return row ? toRecord(row) : null;
    },

    async finishCanceled(id, attempt) {
      const r = await db.generatedImage.updateMany({
        where: { id, status: { in: ['queued', 'running'] }, cancelRequestedAt: { not: null }, ...(attempt === undefined ? {} : { attempts: attempt }) },
        data: { status: 'canceled', finishedAt: new Date() },
      });
      if (r.count === 1 && attempt !== undefined) await closeAttempt(id, attempt, 'canceled');
      return r.count === 1;
    },

    async release(id, attempt, cause, maxEngineFailures = Number.POSITIVE_INFINITY) {
      return db.$transaction(async (tx) => {
        const owned = await tx.generatedImage.findFirst({ where: { id, attempts: attempt, status: 'running' }, select: { id: true } });
        if (!owned) return 'not_owned' as const;
        const outcome: AttemptOutcome = cause === 'engine' ? 'engine_failed' : 'released';
        await tx.jobAttempt.updateMany({ where: { imageId: id, attempt, outcome: null }, data: { outcome, finishedAt: new Date() } });
        const engineFailures = cause === 'engine' ? await tx.jobAttempt.count({ where: { imageId: id, outcome: 'engine_failed' } }) : 0;
        if (engineFailures >= maxEngineFailures) {
          const f = failure('engine_crashed');
          await tx.generatedImage.update({ where: { id }, data: { status: 'failed', errorCode: f.code, error: f.message, finishedAt: new Date() } });
          await tx.jobAttempt.updateMany({ where: { imageId: id, attempt }, data: { errorCode: 'engine_crashed' } });
          return 'failed' as const;
        }
        await tx.generatedImage.update({ where: { id }, data: { status: 'queued', progress: 0 } });
        return 'released' as const;
      });
    },

    async attempts(id) {
      const rows = await db.jobAttempt.findMany({ where: { imageId: id }, orderBy: { attempt: 'asc' } });
      return rows.map((r) => ({
        attempt: r.attempt,
        workerId: r.workerId,
        outcome: r.outcome as AttemptOutcome | null,
        errorCode: isFailureCode(r.errorCode) ? r.errorCode : null,
        startedAt: r.startedAt,
        finishedAt: r.finishedAt,
      }));
    },

    async findStale({ queuedBefore, runningBefore, limit }) {
      const rows = await db.generatedImage.findMany({
        where: {
          OR: [
            { status: 'queued', updatedAt: { lt: queuedBefore } },
            { status: 'running', updatedAt: { lt: runningBefore } },
          ],
        },
        orderBy: { updatedAt: 'asc' },
        take: limit,
      });
      return rows.map(toRecord);
    },

    async ping() {
      await db.$queryRaw`SELECT 1`;
    },
  };
  return translateErrors(repo, translateDbError);
}
