import { randomUUID } from 'node:crypto';
import { randomSeed } from '../engine/random.js';
import { ImageNotAvailableError, NotFoundError, ServiceUnavailableError, ValidationError } from './errors.js';
import type { CreateImageBody } from './params.js';

/**
 * The generated-images service: what the API does, free of HTTP, Prisma, BullMQ and S3, which
 * it reaches through the ports below (adapters in src/adapters implement them).
 */

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'canceled';

export interface ImageRecord {
  id: string;
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
}

export type NewImage = Pick<ImageRecord, 'id' | 'prompt' | 'negativePrompt' | 'numSteps' | 'guidanceScale' | 'seed' | 'width' | 'height' | 'scheduler'>;

export interface ImagesRepo {
  create(data: NewImage): Promise<ImageRecord>;
  get(id: string): Promise<ImageRecord | null>;
  /** Newest first, strictly older than `before` when given. */
  list(q: { limit: number; before?: { createdAt: Date; id: string } }): Promise<ImageRecord[]>;
  /** Claims the next attempt; null when the job is already finished or canceled. */
  startAttempt(id: string, workerId: string): Promise<{ record: ImageRecord; attempt: number } | null>;
  setProgress(id: string, attempt: number, progress: number): Promise<boolean>;
  succeed(id: string, attempt: number, result: { fileName: string; generationMs: number; model: string }): Promise<boolean>;
  /** `final` marks the job failed; otherwise it goes back to queued for the next attempt. */
  fail(id: string, attempt: number, error: string, final: boolean): Promise<boolean>;
  failUnstarted(id: string, error: string): Promise<boolean>;
  ping(): Promise<void>;
}

export interface JobQueue {
  enqueue(imageId: string): Promise<void>;
}

export interface ImageUrls {
  presignGet(key: string): Promise<{ url: string; expiresAt: Date }>;
}

export interface ImagesServiceDeps {
  repo: ImagesRepo;
  queue: JobQueue;
  storage: ImageUrls;
  log?: { warn: (obj: object, msg: string) => void };
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export class ImagesService {
  constructor(private readonly deps: ImagesServiceDeps) {}

  /**
   * Commits the row, then enqueues its id. If enqueueing fails the row is marked failed with
   * the reason, so it can never sit queued with no job behind it, and the caller gets a 503.
   */
  async create(body: CreateImageBody): Promise<ImageRecord> {
    const record = await this.deps.repo.create({
      id: randomUUID(),
      prompt: body.prompt,
      negativePrompt: body.negative_prompt,
      numSteps: body.num_steps,
      guidanceScale: body.guidance_scale,
      seed: body.seed ?? randomSeed(),
      width: body.width,
      height: body.height,
      scheduler: body.scheduler,
    });
    try {
      await this.deps.queue.enqueue(record.id);
    } catch (err) {
      this.deps.log?.warn({ err, imageId: record.id }, 'enqueue failed; marking the job failed');
      await this.deps.repo.failUnstarted(record.id, 'the job queue was unavailable when the job was submitted; submit it again').catch(() => undefined);
      throw new ServiceUnavailableError('The job queue is unavailable. Please try again later.');
    }
    return record;
  }

  async get(id: string): Promise<ImageRecord> {
    const record = UUID.test(id) ? await this.deps.repo.get(id) : null;
    if (!record) throw new NotFoundError(`No generated image has the id "${id}".`);
    return record;
  }

  async list(limit: number, cursor?: string): Promise<{ items: ImageRecord[]; nextCursor: string | null }> {
    const before = cursor === undefined ? undefined : decodeCursor(cursor);
    const items = await this.deps.repo.list({ limit, ...(before ? { before } : {}) });
    const last = items.at(-1);
    return { items, nextCursor: items.length === limit && last ? encodeCursor(last) : null };
  }

  async url(id: string): Promise<{ url: string; expiresAt: Date }> {
    const record = await this.get(id);
    switch (record.status) {
      case 'succeeded':
        if (!record.fileName) throw new Error(`image ${id} succeeded without a stored object`);
        return this.deps.storage.presignGet(record.fileName);
      case 'failed':
        throw new ImageNotAvailableError(`The image could not be generated: ${record.error ?? 'unknown error'}`, record.status);
      case 'canceled':
        throw new ImageNotAvailableError('The job was canceled; there is no image.', record.status);
      default:
        throw new ImageNotAvailableError('Image is not available yet. Please try again later.', record.status);
    }
  }
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
