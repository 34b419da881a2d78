import { randomUUID } from 'node:crypto';
import { Queue, UnrecoverableError, Worker } from 'bullmq';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer, createRedis, type ProducerQueue } from '../../src/adapters/queue.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { queueSettings } from '../../src/core/wiring.js';
import { createReconciler } from '../../src/worker/reconciler.js';
import type { Config } from '../../src/config.js';
import { isolatedConfig } from '../support/system.js';

/** The reconciler against real Postgres and a real BullMQ queue. */

const silent = { info() {}, warn() {} };
let config: Config;
let db: Db;
let repo: ImagesRepo;
let producer: ProducerQueue;
let inspect: Queue;

beforeAll(async () => {
  config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  repo = createImagesRepo(db);
  producer = createProducer(config.REDIS_URL, queueSettings(config));
  inspect = new Queue(config.QUEUE_NAME, { connection: createRedis(config.REDIS_URL) });
});
// The reconciler scans the whole table and queue: each test starts from an empty table and an
// empty queue, so what one test leaves (a waiting job, a failed row) cannot change another's count.
beforeEach(async () => {
  await db.generatedImage.deleteMany({});
  await inspect.obliterate({ force: true });
});
afterAll(async () => {
  await producer?.close();
  await inspect?.close();
  await db?.$disconnect();
});

async function row(status: 'queued' | 'running' = 'queued'): Promise<string> {
  const id = randomUUID();
  await repo.create({ id, prompt: 'p', negativePrompt: null, numSteps: 5, guidanceScale: 9, seed: 1, width: 64, height: 64, scheduler: 'pndm' });
  if (status === 'running') await repo.startAttempt(id, 'dead-worker');
  // Make it look untouched for a minute.
  await db.$executeRaw`UPDATE generated_images SET updated_at = now() - interval '1 minute' WHERE id = ${id}::uuid`;
  return id;
}

const reconciler = () => createReconciler({ repo, queue: producer, log: silent, queuedGraceMs: 10_000, runningGraceMs: 10_000 });

describe('reconciler', () => {
  it('enqueues a queued row that has no job (enqueue failed after the commit)', async () => {
    const id = await row();
    expect(await producer.jobState(id)).toBeNull();
    const summary = await reconciler().runOnce();
    expect(summary).toMatchObject({ requeued: 1 });
    expect((await producer.jobState(id))?.state).toBe('waiting');
    // A second pass finds the job in flight and does nothing.
    await db.$executeRaw`UPDATE generated_images SET updated_at = now() - interval '1 minute' WHERE id = ${id}::uuid`;
    expect((await reconciler().runOnce()).requeued).toBe(0);
  });

  it('enqueues a running row whose job Redis lost', async () => {
    const id = await row('running');
    await reconciler().runOnce();
    expect((await producer.jobState(id))?.state).toBe('waiting');
  });

  it('marks failed a row whose job the queue failed for good', async () => {
    const id = await row('running');
    await producer.enqueue(id);
    // A consumer that gives up on it, as BullMQ does when a job stalls too often.
    const worker = new Worker(
      config.QUEUE_NAME,
      async () => {
        throw new UnrecoverableError('job stalled more than allowable limit');
      },
      { connection: createRedis(config.REDIS_URL) },
    );
    await expect.poll(async () => (await producer.jobState(id))?.state, { timeout: 10_000 }).toBe('failed');
    await worker.close();
    await reconciler().runOnce();
    // The queue's own reason is no public message: the job says its workers were lost.
    expect(await repo.get(id)).toMatchObject({
      status: 'failed',
      errorCode: 'worker_lost',
      error: 'The workers running the job stopped responding too many times.',
    });
    expect(await repo.attempts(id)).toMatchObject([{ outcome: 'lost', errorCode: 'worker_lost' }]);
  });

  it('leaves fresh rows and rows with live jobs alone', async () => {
    const fresh = randomUUID();
    await repo.create({ id: fresh, prompt: 'p', negativePrompt: null, numSteps: 5, guidanceScale: 9, seed: 1, width: 64, height: 64, scheduler: 'pndm' });
    const waiting = await row();
    await producer.enqueue(waiting);
    const before = await inspect.getJobCounts('waiting');
    const summary = await reconciler().runOnce();
    expect(summary.requeued + summary.failed).toBe(0);
    expect(await producer.jobState(fresh)).toBeNull();
    expect(await inspect.getJobCounts('waiting')).toEqual(before);
  });
});
