import type pg from 'pg';
import { sqlPool, type Db, type GeneratedImage } from './db/client.js';
import { translateDbError } from './db/errors.js';
import { translateErrors } from './translate.js';
import type { Admission, AttemptOutcome, ImageRecord, ImagesRepo, NewImage, QuotaLimits, Quotas } from '../core/images.js';
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

/** A generated_images row as a raw query returns it (snake_case columns). */
type GeneratedImageRow = Record<string, unknown>;

/**
 * A raw row as Prisma's GeneratedImage: every column's name in camelCase, as the model's @map
 * attributes spell them, so RETURNING * keeps up with columns added later.
 */
function fromRow(row: GeneratedImageRow): GeneratedImage {
  return Object.fromEntries(Object.entries(row).map(([k, v]) => [k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()), v])) as unknown as GeneratedImage;
}

type LimitsRow = { max_in_flight: number | null; daily_pixel_steps: bigint | null };

/** A tenant's own limit where set, else the configured default (0 = none). */
function limitsOf(row: LimitsRow | undefined, defaults: Pick<QuotaLimits, 'maxInFlight' | 'dailyPixelSteps'>) {
  return {
    maxInFlight: row?.max_in_flight ?? defaults.maxInFlight,
    dailyPixelSteps: row?.daily_pixel_steps === null || row?.daily_pixel_steps === undefined ? defaults.dailyPixelSteps : Number(row.daily_pixel_steps),
  };
}

/**
 * Admits jobs in one statement, one result per job in the same order (see ImagesRepo.createMany):
 * the batch's tenants are locked for this statement (in id order, so concurrent batches cannot
 * deadlock); each tenant's jobs, in arrival order, are ranked after its jobs in flight on the same
 * model and admitted while the running counts (of all its models) stay within its limits; the
 * counters themselves follow the inserted rows (statement trigger, tenant_usage_counters, and per
 * model tenant_model_usage). In SQL on the client's own pool: one round trip, no
 * query compiler.
 */
async function admitJobs(q: pg.Pool | pg.PoolClient, batch: NewImage[], quota: Quotas): Promise<Admission[]> {
  if (batch.length === 0) return [];
  const col = <T>(f: (d: NewImage) => T) => batch.map(f);
  const { rows } = await q.query<GeneratedImageRow>({
    name: 't2i-admit-jobs',
    text: `
    WITH req AS (
      SELECT r.*, r.ord::int AS ord_
        FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::float8[], $7::int8[], $8::int[], $9::int[], $10::text[], $11::int8[],
                    $14::int[], $15::text[], $16::text[], $17::float8[], $18::text[], $19::text[])
             WITH ORDINALITY AS r(id, tenant_id, prompt, negative_prompt, num_steps, guidance_scale, seed, width, height, scheduler, pixel_steps,
                                  num_images, webhook_url, model, strength, image_key, mask_key, ord)),
    t AS (
      SELECT id AS tenant_id, in_flight,
             CASE WHEN usage_day = (now() AT TIME ZONE 'UTC')::date THEN pixel_steps_today ELSE 0 END AS today,
             COALESCE(max_in_flight, $12::int) AS max_in_flight,
             COALESCE(daily_pixel_steps, $13::bigint) AS budget
        FROM tenants WHERE id IN (SELECT tenant_id FROM req) ORDER BY id FOR UPDATE),
    -- The tenant's jobs in flight on each model of the batch (read under the tenant's lock).
    tm AS (
      SELECT tenant_id, model, in_flight AS in_flight_model FROM tenant_model_usage
       WHERE (tenant_id, model) IN (SELECT tenant_id, model FROM req)),
    ranked AS (
      SELECT req.*, t.in_flight, t.today, t.max_in_flight, t.budget, COALESCE(tm.in_flight_model, 0) AS in_flight_model,
             row_number() OVER w AS k, row_number() OVER wm AS k_model, sum(req.pixel_steps) OVER w AS cost_so_far
        FROM req JOIN t USING (tenant_id) LEFT JOIN tm USING (tenant_id, model)
      WINDOW w AS (PARTITION BY req.tenant_id ORDER BY req.ord_), wm AS (PARTITION BY req.tenant_id, req.model ORDER BY req.ord_))
    INSERT INTO generated_images (id, tenant_id, prompt, negative_prompt, num_steps, guidance_scale, seed, width, height,
                                  scheduler, pixel_steps, num_images, webhook_url, model, strength, image_key, mask_key, queue_priority)
    -- Its rank among the tenant's jobs in flight on its model (each model has its own queue): the
    -- tenant's k-th job there waits behind every other tenant's (k-1)-th, not behind whole
    -- backlogs. The limits count the tenant's jobs of every model.
    SELECT id, tenant_id, prompt, negative_prompt, num_steps, guidance_scale, seed, width, height, scheduler, pixel_steps,
           num_images, webhook_url, model, strength, image_key, mask_key, LEAST(in_flight_model + k_model, ${MAX_PRIORITY})
      FROM ranked
     WHERE (max_in_flight <= 0 OR in_flight + k <= max_in_flight) AND (budget <= 0 OR today + cost_so_far <= budget)
     ORDER BY ord_
 RETURNING *`,
    values: [
      col((d) => d.id),
      col((d) => d.tenantId),
      col((d) => d.prompt),
      col((d) => d.negativePrompt),
      col((d) => d.numSteps),
      col((d) => d.guidanceScale),
      col((d) => String(d.seed)),
      col((d) => d.width),
      col((d) => d.height),
      col((d) => d.scheduler),
      col((d) => String(d.pixelSteps)),
      quota.maxInFlight,
      quota.dailyPixelSteps,
      col((d) => d.numImages ?? 1),
      col((d) => d.webhookUrl ?? null),
      col((d) => d.model),
      col((d) => d.strength ?? null),
      col((d) => d.imageKey ?? null),
      col((d) => d.maskKey ?? null),
    ],
  });
  const admitted = new Map(rows.map((r) => [String(r.id), toRecord(fromRow(r))]));
  const refusedTenants = [...new Set(batch.filter((d) => !admitted.has(d.id)).map((d) => d.tenantId))];
  // Refused (the rare path): which limit, from the counters as they are now.
  const limits = new Map<string, { in_flight: number; today: string; max_in_flight: number; budget: string }>();
  if (refusedTenants.length > 0) {
    const r = await q.query<{ id: string; in_flight: number; today: string; max_in_flight: number; budget: string }>(
      `SELECT id, in_flight, CASE WHEN usage_day = (now() AT TIME ZONE 'UTC')::date THEN pixel_steps_today ELSE 0 END AS today,
              COALESCE(max_in_flight, $2::int) AS max_in_flight, COALESCE(daily_pixel_steps, $3::bigint) AS budget
         FROM tenants WHERE id = ANY($1::uuid[])`,
      [refusedTenants, quota.maxInFlight, quota.dailyPixelSteps],
    );
    for (const t of r.rows) limits.set(t.id, t);
  }
  return batch.map((d): Admission => {
    const record = admitted.get(d.id);
    if (record) return { record };
    const u = limits.get(d.tenantId);
    if (!u) throw new Error(`tenant ${d.tenantId} does not exist`);
    if (u.max_in_flight > 0 && u.in_flight >= u.max_in_flight) return { exceeded: 'in_flight', limit: u.max_in_flight, used: u.in_flight };
    return { exceeded: 'daily_pixel_steps', limit: Number(u.budget), used: Number(u.today) };
  });
}

export function createImagesRepo(db: Db): ImagesRepo {
  /** Closes an attempt's row with its outcome, unless it was closed already. */
  const closeAttempt = (id: string, attempt: number, outcome: AttemptOutcome, errorCode: string | null = null) => db.$executeRaw`
        UPDATE job_attempts SET outcome = ${outcome}, error_code = ${errorCode}, finished_at = now()
         WHERE image_id = ${id}::uuid AND attempt = ${attempt} AND outcome IS NULL`;

  const repo: ImagesRepo = {
    async create(data, quota, key) {
      if (!key) return (await repo.createMany([data], quota))[0]!;
      // With an Idempotency-Key: the key is claimed under the tenant's row lock, in the admitting
      // transaction, so two requests with one key can never both create a job, and a live key gives
      // back what it was used for whatever the quotas say now (a replay is never refused).
      const client = await sqlPool(db).connect();
      try {
        await client.query('BEGIN');
        const tenant = await client.query('SELECT 1 FROM tenants WHERE id = $1::uuid FOR UPDATE', [data.tenantId]);
        if (tenant.rowCount !== 1) throw new Error(`tenant ${data.tenantId} does not exist`);
        const live = await client.query<{ fingerprint: string; image_id: string }>(
          `SELECT fingerprint, image_id::text FROM idempotency_keys
            WHERE tenant_id = $1::uuid AND key = $2 AND created_at >= now() - make_interval(secs => $3::float8)`,
          [data.tenantId, key.key, key.ttlMs / 1000],
        );
        const [existing] = live.rows;
        if (existing) {
          await client.query('COMMIT');
          return { existing: { fingerprint: existing.fingerprint, imageId: existing.image_id } };
        }
        const [result] = await admitJobs(client, [data], quota);
        // Admitted: the key is new, or an expired one taken over. Refused: no key is kept, so the
        // same request may be sent again once the quota allows.
        if (result && 'record' in result) {
          await client.query(
            `INSERT INTO idempotency_keys (tenant_id, key, fingerprint, image_id) VALUES ($1::uuid, $2, $3, $4::uuid)
             ON CONFLICT (tenant_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, image_id = EXCLUDED.image_id, created_at = now()`,
            [data.tenantId, key.key, key.fingerprint, data.id],
          );
        }
        await client.query('COMMIT');
        return result!;
      } catch (err) {
        await client.query('ROLLBACK').catch(() => undefined);
        throw err;
      } finally {
        client.release();
      }
    },

    async createMany(batch, quota) {
      return admitJobs(sqlPool(db), batch, quota);
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
      const [t] = await db.$queryRaw<Array<LimitsRow & { in_flight: number; today: bigint }>>`
        SELECT max_in_flight, daily_pixel_steps, in_flight,
               CASE WHEN usage_day = (now() AT TIME ZONE 'UTC')::date THEN pixel_steps_today ELSE 0 END AS today
          FROM tenants WHERE id = ${tenantId}::uuid`;
      const [jobs] = await db.$queryRaw<Array<{ n: number }>>`
        SELECT count(*)::int AS n FROM generated_images WHERE tenant_id = ${tenantId}::uuid AND created_at >= ${defaults.dayStart}`;
      return { inFlight: t?.in_flight ?? 0, pixelStepsToday: Number(t?.today ?? 0), jobsToday: jobs?.n ?? 0, limits: limitsOf(t, defaults) };
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
      // different models wait in different queues, so ranks are counted per model. Jobs admitted
      // by one statement share their created_at: among them the order admission ranked them in
      // (their priority) decides, not their random ids.
      const rows = await db.$queryRaw<Array<{ id: string; rank: bigint; model: string | null }>>`
        SELECT id, rank, model FROM (
          SELECT id, status, queue_priority, model,
                 row_number() OVER (PARTITION BY tenant_id, model ORDER BY (status = 'running') DESC, created_at, queue_priority, id) AS rank
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
      // attempt's row exists from the moment it does; it returns the claimed row, so a claim is
      // one round trip. Parameters the job left to its model (a model never served when it was
      // submitted) take this worker's defaults, and the charge is corrected to them (the
      // right-hand sides read the row as it was; the tenant's counters follow, see the
      // t2i_tenant_usage trigger).
      const { rows } = await sqlPool(db).query<GeneratedImageRow>({
        name: 't2i-start-attempt',
        text: `
        WITH claimed AS (
          UPDATE generated_images
             SET status = 'running', attempts = attempts + 1, progress = 0, worker_id = $2,
                 started_at = now(), updated_at = now(), error = NULL, error_code = NULL,
                 num_steps = COALESCE(num_steps, $3::int),
                 guidance_scale = COALESCE(guidance_scale, $4::float8),
                 width = COALESCE(width, $5::int),
                 height = COALESCE(height, $6::int),
                 scheduler = COALESCE(scheduler, $7::text),
                 pixel_steps = CASE WHEN num_steps IS NULL OR width IS NULL OR height IS NULL
                                    THEN COALESCE(COALESCE(width, $5::int)::bigint * COALESCE(height, $6::int) * COALESCE(num_steps, $3::int) * num_images, pixel_steps)
                                    ELSE pixel_steps END
           WHERE id = $1::uuid AND status IN ('queued', 'running') AND cancel_requested_at IS NULL
       RETURNING *),
        opened AS (
          INSERT INTO job_attempts (image_id, attempt, worker_id) SELECT id, attempts, $2 FROM claimed)
        SELECT * FROM claimed`,
        values: [id, workerId, d?.numSteps ?? null, d?.guidanceScale ?? null, d?.width ?? null, d?.height ?? null, d?.scheduler ?? null],
      });
      const row = rows[0];
      if (!row) return null;
      const record = toRecord(fromRow(row));
      return { record, attempt: record.attempts };
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
