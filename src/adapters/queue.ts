import { DelayedError, Queue, UnrecoverableError, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { DependencyUnavailableError } from '../core/errors.js';
import { GENERATE_JOB, queueNameFor, type GeneratePayload, type QueueSettings } from '../core/jobs.js';
import { asError, translateErrors } from './translate.js';

/**
 * BullMQ on Redis: the only module that imports bullmq and ioredis. Jobs are the catalog's
 * `generate` job, keyed by the image id (so enqueueing the same image twice is a no-op), on the
 * queue of the job's model (QUEUE_NAME.MODEL, src/core/jobs.ts queueNameFor).
 */

export { UnrecoverableError };

/** BullMQ's lowest priority (its PRIORITY_LIMIT, 2^21 - 1); 1 is the highest we use. */
const PRIORITY_LIMIT = 2 ** 21 - 1;

export interface RedisOptions {
  /** Fail commands at once while disconnected instead of buffering them (API: answer 503 fast). */
  failFast?: boolean;
}

export function createRedis(url: string, opts: RedisOptions = {}): Redis {
  return new Redis(url, {
    // BullMQ workers need blocking commands to wait indefinitely.
    maxRetriesPerRequest: opts.failFast ? 1 : null,
    enableOfflineQueue: !opts.failFast,
    connectTimeout: 5_000,
    lazyConnect: false,
    retryStrategy: (times) => Math.min(200 * 2 ** times, 5_000),
  });
}

/** Resolves once the connection is ready (a fail-fast one refuses commands until then). */
export async function whenReady(connection: Redis, timeoutMs: number): Promise<void> {
  if (connection.status === 'ready') return;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`Redis not ready after ${timeoutMs} ms`)), timeoutMs);
    connection.once('ready', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export type QueueJobState = 'waiting' | 'active' | 'delayed' | 'completed' | 'failed' | 'prioritized' | 'waiting-children' | 'unknown';

/**
 * BullMQ keeps jobs in Redis: an evicting Redis drops them silently under memory pressure.
 * Throws with the fix when maxmemory-policy is anything but noeviction.
 */
export async function assertNoEviction(redis: Redis): Promise<void> {
  const info = await redis.info('memory');
  const policy = /maxmemory_policy:(\S+)/.exec(info)?.[1];
  if (policy && policy !== 'noeviction') {
    throw new Error(
      `Redis maxmemory-policy is "${policy}"; the job queue needs "noeviction" or jobs can be lost. ` +
        'Fix: redis-cli CONFIG SET maxmemory-policy noeviction (and set it in redis.conf or your managed Redis settings).',
    );
  }
}

/** Connects once to check Redis is reachable and will not evict; for process start-up. */
export async function checkRedis(url: string): Promise<void> {
  const redis = new Redis(url, { lazyConnect: true, connectTimeout: 5_000, maxRetriesPerRequest: 1, retryStrategy: () => null });
  try {
    await redis.connect();
    await assertNoEviction(redis);
  } catch (err) {
    if ((err as Error).message.includes('maxmemory-policy')) throw err;
    throw new Error(`Redis at ${redactUrl(url)} is not reachable: ${(err as Error).message}`, { cause: err });
  } finally {
    redis.disconnect();
  }
}

/** A Redis URL without its password, for messages. */
function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return 'the configured REDIS_URL';
  }
}

/** ioredis errors that mean Redis cannot be reached right now (fail-fast connections, closed sockets). */
function isRedisUnavailable(err: unknown): boolean {
  for (
    let e = err as { name?: string; code?: string; message?: string; cause?: unknown } | undefined, depth = 0;
    e && depth < 5;
    e = e.cause as typeof e, depth++
  ) {
    const text = `${e.name ?? ''} ${e.message ?? ''} ${e.code ?? ''}`;
    if (
      /MaxRetriesPerRequestError|Stream isn't writeable|enableOfflineQueue|Connection is closed|ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|EHOSTUNREACH/i.test(
        text,
      )
    )
      return true;
  }
  return false;
}

export function translateRedisError(err: unknown): Error {
  return isRedisUnavailable(err) ? new DependencyUnavailableError('job queue', { cause: err }) : asError(err);
}

/** Counts of one model's queue by state. */
export type QueueCounts = Record<'waiting' | 'active' | 'delayed' | 'failed' | 'completed' | 'prioritized', number>;

/** The producer side of every model's queue; each method names the model whose queue it acts on. */
export interface ProducerQueue {
  /** Resolves once connected (commands fail fast while disconnected, so wait at start-up). */
  ready(timeoutMs?: number): Promise<void>;
  /**
   * Adds the job at a priority: BullMQ runs priority 1 first and equal priorities in the order
   * they were added. Every job gets one (>= 1): jobs without a priority would go to BullMQ's wait
   * list, which workers empty before they look at prioritized jobs at all.
   */
  enqueue(model: string, imageId: string, priority: number): Promise<void>;
  /** Many jobs of one model in one round trip (BullMQ's addBulk: one pipeline of its add scripts). */
  enqueueMany(model: string, jobs: Array<{ imageId: string; priority: number }>): Promise<void>;
  /**
   * Moves a waiting job to another priority (behind the jobs already there); an active job only
   * records it. False when Redis has no such job.
   */
  changePriority(model: string, imageId: string, priority: number): Promise<boolean>;
  /** The BullMQ job's state, or null when Redis has no such job. */
  jobState(model: string, imageId: string): Promise<{ state: QueueJobState; failedReason?: string } | null>;
  /** Removes a job that no worker holds; false when it is locked by one (or absent). */
  remove(model: string, imageId: string): Promise<boolean>;
  depth(model: string): Promise<number>;
  /**
   * How many waiting jobs a worker will take before this one (0: it is next), or null when the
   * job is not waiting (running, delayed for a retry, finished or unknown).
   */
  position(model: string, imageId: string): Promise<number | null>;
  counts(model: string): Promise<QueueCounts>;
  /** A round trip to Redis, for readiness probes. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** Most models' queues one producer keeps open; the least recently used is closed past it (names come from requests' models and job rows). */
const MAX_OPEN_QUEUES = 256;

export function createProducer(redisUrl: string, s: QueueSettings): ProducerQueue {
  const connection = createRedis(redisUrl, { failFast: true });
  // One BullMQ Queue per model, all on the one connection (a Queue issues no blocking commands).
  const queues = new Map<string, Queue<GeneratePayload>>();
  const queueOf = (model: string): Queue<GeneratePayload> => {
    let queue = queues.get(model);
    if (queue) {
      // Most recently used last: Map keeps insertion order.
      queues.delete(model);
      queues.set(model, queue);
      return queue;
    }
    // A BullMQ Queue made on a connection that is not ready waits for it before its first command,
    // however long Redis is away: fail fast instead, as this connection does for every command
    // (the first job of a model may come while Redis is down; the reconciler enqueues it later).
    if (connection.status !== 'ready') throw new Error("Stream isn't writeable and enableOfflineQueue options is false");
    queue = new Queue<GeneratePayload>(queueNameFor(s.queueName, model), {
      connection,
      defaultJobOptions: {
        attempts: s.attempts,
        backoff: { type: 'exponential', delay: s.backoffMs },
        removeOnComplete: { count: s.keepCompleted },
        removeOnFail: { count: s.keepFailed },
      },
    });
    // Connection errors surface as rejected calls; without a listener they would crash the process.
    queue.on('error', () => undefined);
    queues.set(model, queue);
    if (queues.size > MAX_OPEN_QUEUES) {
      const [oldest, q] = queues.entries().next().value!;
      queues.delete(oldest);
      // The connection is shared: closing a Queue given a connection leaves it open.
      void q.close().catch(() => undefined);
    }
    return queue;
  };
  const priorityOf = (p: number) => Math.min(Math.max(1, Math.round(p)), PRIORITY_LIMIT);
  return translateErrors<ProducerQueue>(
    {
      async ready(timeoutMs = 10_000) {
        await whenReady(connection, timeoutMs);
      },
      async enqueue(model, imageId, priority) {
        await queueOf(model).add(GENERATE_JOB.name, { imageId }, { jobId: imageId, priority: priorityOf(priority) });
      },
      async enqueueMany(model, jobs) {
        await queueOf(model).addBulk(
          jobs.map(({ imageId, priority }) => ({ name: GENERATE_JOB.name, data: { imageId }, opts: { jobId: imageId, priority: priorityOf(priority) } })),
        );
      },
      async changePriority(model, imageId, priority) {
        const job = await queueOf(model).getJob(imageId);
        if (!job) return false;
        await job.changePriority({ priority: priorityOf(priority) });
        return true;
      },
      async jobState(model, imageId) {
        const job = await queueOf(model).getJob(imageId);
        if (!job) return null;
        const state = await job.getState();
        return { state, ...(job.failedReason ? { failedReason: job.failedReason } : {}) };
      },
      async remove(model, imageId) {
        try {
          return (await queueOf(model).remove(imageId)) === 1;
        } catch {
          // BullMQ refuses to remove a job a worker holds the lock of.
          return false;
        }
      },
      async depth(model) {
        const c = await queueOf(model).getJobCounts('waiting', 'delayed', 'prioritized');
        return (c.waiting ?? 0) + (c.delayed ?? 0) + (c.prioritized ?? 0);
      },
      async position(model, imageId) {
        // Workers take from the right end of the wait list (RPOPLPUSH), then, when it is empty,
        // the lowest score of the prioritized set: what is ahead of a job follows from where it is.
        const queue = queueOf(model);
        const waitKey = queue.toKey('wait');
        const [index, length] = await Promise.all([connection.lpos(waitKey, imageId), connection.llen(waitKey)]);
        if (typeof index === 'number') return length - 1 - index;
        const rank = await connection.zrank(queue.toKey('prioritized'), imageId);
        return rank === null ? null : length + rank;
      },
      async counts(model) {
        const c = await queueOf(model).getJobCounts('waiting', 'active', 'delayed', 'failed', 'completed', 'prioritized');
        return c as QueueCounts;
      },
      async ping() {
        await connection.ping();
      },
      async close() {
        await Promise.allSettled([...queues.values()].map((q) => q.close()));
        queues.clear();
        connection.disconnect();
      },
    },
    translateRedisError,
  );
}

export interface JobContext {
  id: string;
  imageId: string;
  /** 1 for the first attempt. */
  attempt: number;
  maxAttempts: number;
  /** When the job was first enqueued. */
  enqueuedAt: Date;
  /** Aborted when the consumer's shutdown grace period runs out while this job runs. */
  signal: AbortSignal;
}

export type JobHandler = (job: JobContext) => Promise<void>;

export interface QueueConsumer {
  worker: Worker<GeneratePayload>;
  /** Stops fetching jobs at once (the active one goes on); resume() starts again. */
  pause(): Promise<void>;
  resume(): Promise<void>;
  /**
   * Stops taking jobs and waits for the active ones; once `graceMs` has passed, tells them to
   * stop (their signals abort) and waits for them to hand their jobs back.
   */
  close(graceMs?: number): Promise<void>;
}

/**
 * A handler throws an error of this name to hand its job back unfinished: the job returns to
 * the queue at once and the attempt is not counted as failed.
 */
export const RELEASED_ERROR_NAME = 'JobReleasedError';

/**
/**
 * A consumer of one model's queue, running up to `concurrency` jobs at a time (the engine
 * batches them). Lock and stalled-check settings come from the shared configuration: BullMQ runs
 * the stalled check queue-wide, so every worker must use the same.
 */
export function createConsumer(
  redisUrl: string,
  s: QueueSettings,
  model: string,
  handler: JobHandler,
  onError?: (err: Error) => void,
  concurrency = 1,
): QueueConsumer {
  const connection = createRedis(redisUrl);
  const active = new Set<AbortController>();
  const worker = new Worker<GeneratePayload>(
    queueNameFor(s.queueName, model),
    async (job: Job<GeneratePayload>, token?: string) => {
      const parsed = GENERATE_JOB.payload.safeParse(job.data);
      if (!parsed.success || job.name !== GENERATE_JOB.name) {
        throw new UnrecoverableError(`job ${job.id}: not a ${GENERATE_JOB.name} job with an image id`);
      }
      const controller = new AbortController();
      active.add(controller);
      try {
        await handler({
          id: job.id ?? parsed.data.imageId,
          imageId: parsed.data.imageId,
          attempt: job.attemptsMade + 1,
          maxAttempts: job.opts.attempts ?? 1,
          enqueuedAt: new Date(job.timestamp),
          signal: controller.signal,
        });
      } catch (err) {
        if ((err as Error).name === RELEASED_ERROR_NAME && token) {
          // Back to the queue now, for any worker; DelayedError tells BullMQ this is not a failure.
          await job.moveToDelayed(Date.now(), token);
          throw new DelayedError();
        }
        throw err;
      } finally {
        active.delete(controller);
      }
    },
    {
      connection,
      concurrency,
      lockDuration: s.lockMs,
      stalledInterval: s.stalledIntervalMs,
      // A job whose worker died is moved back by the stalled check; after this many stalls it
      // fails (the reconciler then marks its row failed).
      maxStalledCount: s.maxStalls,
      autorun: false,
    },
  );
  worker.on('error', (err) => onError?.(err));
  return {
    worker,
    async pause() {
      // true: do not wait for the active job; it ends on its own (handed back if the engine is gone).
      await worker.pause(true);
    },
    async resume() {
      await worker.resume();
    },
    async close(graceMs = Number.POSITIVE_INFINITY) {
      const timer = Number.isFinite(graceMs) ? setTimeout(() => active.forEach((c) => c.abort()), graceMs) : undefined;
      try {
        await worker.close();
      } finally {
        clearTimeout(timer);
        connection.disconnect();
      }
    },
  };
}
