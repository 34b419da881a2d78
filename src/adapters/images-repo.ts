import type { Db, GeneratedImage } from './db/client.js';
import type { ImageRecord, ImagesRepo, NewImage } from '../core/images.js';

/**
 * The generated_images table through Prisma. Updates a worker makes while it owns an attempt
 * are fenced on `attempts`: startAttempt increments it and returns the new value, and every
 * later write matches on it, so a worker whose job was taken over (it stalled, its lock
 * expired, another worker started attempt n+1) changes nothing.
 */

function toRecord(row: GeneratedImage): ImageRecord {
  return {
    id: row.id,
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
  };
}

export function createImagesRepo(db: Db): ImagesRepo {
  return {
    async create(data: NewImage) {
      const row = await db.generatedImage.create({
        data: {
          id: data.id,
          prompt: data.prompt,
          negativePrompt: data.negativePrompt,
          numSteps: data.numSteps,
          guidanceScale: data.guidanceScale,
          seed: BigInt(data.seed),
          width: data.width,
          height: data.height,
          scheduler: data.scheduler,
        },
      });
      return toRecord(row);
    },

    async get(id) {
      const row = await db.generatedImage.findUnique({ where: { id } });
      return row ? toRecord(row) : null;
    },

    async list({ limit, before }) {
      const rows = await db.generatedImage.findMany({
        where: before ? { OR: [{ createdAt: { lt: before.createdAt } }, { createdAt: before.createdAt, id: { lt: before.id } }] } : {},
        orderBy: [{ createdAt: 'desc' }, { id: 'desc' }],
        take: limit,
      });
      return rows.map(toRecord);
    },

    async startAttempt(id, workerId) {
      // One statement, so two workers can never both believe they own the same attempt.
      const started = await db.$queryRaw<Array<{ attempts: number }>>`
        UPDATE generated_images
           SET status = 'running', attempts = attempts + 1, progress = 0, worker_id = ${workerId},
               started_at = now(), updated_at = now(), error = NULL
         WHERE id = ${id}::uuid AND status IN ('queued', 'running') AND cancel_requested_at IS NULL
     RETURNING attempts`;
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
      const r = await db.generatedImage.updateMany({
        where: { id, attempts: attempt, status: 'running' },
        data: {
          status: 'succeeded',
          progress: 100,
          fileName: result.fileName,
          generationMs: Math.round(result.generationMs),
          model: result.model,
          finishedAt: new Date(),
          error: null,
        },
      });
      return r.count === 1;
    },

    async fail(id, attempt, error, final) {
      const r = await db.generatedImage.updateMany({
        where: { id, attempts: attempt, status: 'running' },
        // A failure that will be retried puts the row back in the queue, with the reason kept.
        data: final ? { status: 'failed', error, finishedAt: new Date() } : { status: 'queued', error, progress: 0 },
      });
      return r.count === 1;
    },

    async failAny(id, error) {
      const r = await db.generatedImage.updateMany({
        where: { id, status: { in: ['queued', 'running'] } },
        data: { status: 'failed', error, finishedAt: new Date() },
      });
      return r.count === 1;
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
      return r.count === 1;
    },

    async release(id, attempt, reason) {
      const r = await db.generatedImage.updateMany({
        where: { id, attempts: attempt, status: 'running' },
        data: { status: 'queued', progress: 0, error: reason },
      });
      return r.count === 1;
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
}
