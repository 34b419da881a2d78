import { randomUUID } from 'node:crypto';
import { Queue, UnrecoverableError, Worker } from 'bullmq';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer, createRedis, type ProducerQueue } from '../../src/adapters/queue.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { queueNameFor } from '../../src/core/jobs.js';
import { queueSettings } from '../../src/core/wiring.js';
import { createReconciler } from '../../src/worker/reconciler.js';
import type { Config } from '../../src/config.js';
import { createTenant, insertJob, TEST_MODEL } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

/** The reconciler against real Postgres and a real BullMQ queue. */

const silent = { info() {}, warn() {} };
let config: Config;
let db: Db;
let repo: ImagesRepo;
let producer: ProducerQueue;
let inspect: Queue;
let tenantId: string;

beforeAll(async () => {
  config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  repo = createImagesRepo(db);
  tenantId = await createTenant(db);
  producer = createProducer(config.REDIS_URL, queueSettings(config));
  inspect = new Queue(queueNameFor(config.QUEUE_NAME, TEST_MODEL), { connection: createRedis(config.REDIS_URL) });
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
  await insertJob(repo, { id, tenantId, prompt: 'p', negativePrompt: null, numSteps: 5, guidanceScale: 9, seed: 1, width: 64, height: 64, scheduler: 'pndm' });
  if (status === 'running') await repo.startAttempt(id, 'dead-worker');
  // Make it look untouched for a minute.
  await db.$executeRaw`UPDATE generated_images SET updated_at = now() - interval '1 minute' WHERE id = ${id}::uuid`;
  return id;
}

const reconciler = () => createReconciler({ repo, queue: producer, log: silent, model: TEST_MODEL, queuedGraceMs: 10_000, runningGraceMs: 10_000 });

describe('reconciler', () => {
  it('enqueues a queued row that has no job (enqueue failed after the commit)', async () => {
    const id = await row();
    expect(await producer.jobState(TEST_MODEL, id)).toBeNull();
    const summary = await reconciler().runOnce();
    expect(summary).toMatchObject({ requeued: 1 });
    // Every job is queued with a priority (its tenant rank): BullMQ calls such a waiting job "prioritized".
    expect((await producer.jobState(TEST_MODEL, id))?.state).toBe('prioritized');
    // A second pass finds the job in flight and does nothing.
    await db.$executeRaw`UPDATE generated_images SET updated_at = now() - interval '1 minute' WHERE id = ${id}::uuid`;
    expect((await reconciler().runOnce()).requeued).toBe(0);
  });

  it('enqueues a running row whose job Redis lost', async () => {
    const id = await row('running');
    await reconciler().runOnce();
    // Every job is queued with a priority (its tenant rank): BullMQ calls such a waiting job "prioritized".
    expect((await producer.jobState(TEST_MODEL, id))?.state).toBe('prioritized');
  });

  it('marks failed a row whose job the queue failed for good', async () => {
    const id = await row('running');
    await producer.enqueue(TEST_MODEL, id, 1);
    // A consumer that gives up on it, as BullMQ does when a job stalls too often.
    const worker = new Worker(
      queueNameFor(config.QUEUE_NAME, TEST_MODEL),
      async () => {
        throw new UnrecoverableError('job stalled more than allowable limit');
      },
      { connection: createRedis(config.REDIS_URL) },
    );
    await expect.poll(async () => (await producer.jobState(TEST_MODEL, id))?.state, { timeout: 10_000 }).toBe('failed');
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
    await insertJob(repo, {
      id: fresh,
      tenantId,
      prompt: 'p',
      negativePrompt: null,
      numSteps: 5,
      guidanceScale: 9,
      seed: 1,
      width: 64,
      height: 64,
      scheduler: 'pndm',
    });
    const waiting = await row();
    await producer.enqueue(TEST_MODEL, waiting, 1);
    const before = await inspect.getJobCounts('waiting', 'prioritized');
    const summary = await reconciler().runOnce();
    expect(summary.requeued + summary.failed).toBe(0);
    expect(await producer.jobState(TEST_MODEL, fresh)).toBeNull();
    expect(await inspect.getJobCounts('waiting', 'prioritized')).toEqual(before);
  });

  it("keeps each queued job at its rank among its tenant's jobs in flight (fair scheduling), in the queue and in the row", async () => {
    const tenant = await createTenant(db);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const job = await insertJob(repo, {
        id: randomUUID(),
        tenantId: tenant,
        prompt: `fair ${i}`,
        negativePrompt: null,
        numSteps: 1,
        guidanceScale: 9,
        seed: 1,
        width: 64,
        height: 64,
        scheduler: 'pndm',
      });
      // Queued behind the tenant's own earlier jobs: priority = 1 + jobs already in flight.
      expect(job.queuePriority).toBe(i + 1);
      await producer.enqueue(TEST_MODEL, job.id, job.queuePriority);
    }
    // The first two finish and the third starts: the last two are now second and third in line.
    const rows = await db.generatedImage.findMany({ where: { tenantId: tenant }, orderBy: { createdAt: 'asc' }, select: { id: true } });
    ids.push(...rows.map((r) => r.id));
    await db.generatedImage.updateMany({ where: { id: { in: ids.slice(0, 2) } }, data: { status: 'succeeded', finishedAt: new Date() } });
    await db.generatedImage.update({ where: { id: ids[2]! }, data: { status: 'running', attempts: 1 } });
    expect((await inspect.getJob(ids[3]!))?.priority).toBe(4);

    await reconciler().runOnce();
    for (const [id, rank] of [
      [ids[3]!, 2],
      [ids[4]!, 3],
    ] as const) {
      expect((await inspect.getJob(id))?.priority, id).toBe(rank);
      expect((await repo.get(id))?.queuePriority).toBe(rank);
      expect(await producer.jobState(TEST_MODEL, id)).toMatchObject({ state: 'prioritized' });
    }
    // Nothing of this tenant's is left to correct.
    const left = await repo.unfairPriorities(10_000);
    expect(left.filter((m) => ids.includes(m.id))).toEqual([]);
  });

  it("looks for each row's job on its own model's queue, and enqueues it there: a model with no worker keeps its jobs", async () => {
    const other = 'model-without-worker';
    const id = randomUUID();
    await insertJob(repo, {
      id,
      tenantId,
      model: other,
      prompt: 'p',
      negativePrompt: null,
      numSteps: 5,
      guidanceScale: 9,
      seed: 1,
      width: 64,
      height: 64,
      scheduler: 'pndm',
    });
    await db.$executeRaw`UPDATE generated_images SET updated_at = now() - interval '1 minute' WHERE id = ${id}::uuid`;
    expect((await reconciler().runOnce()).requeued).toBe(1);
    expect((await producer.jobState(other, id))?.state).toBe('prioritized');
    // Not on the reconciling worker's queue.
    expect(await producer.jobState(TEST_MODEL, id)).toBeNull();
    await producer.remove(other, id);
  });

  it('gives a row from before models had names to its own model and enqueues it on that queue', async () => {
    const id = await row();
    await db.$executeRaw`UPDATE generated_images SET model = NULL WHERE id = ${id}::uuid`;
    expect((await reconciler().runOnce()).requeued).toBe(1);
    expect((await repo.get(id))?.model).toBe(TEST_MODEL);
    expect((await producer.jobState(TEST_MODEL, id))?.state).toBe('prioritized');
  });

  it("ranks a tenant's jobs per model: its first job on another model is first in that model's line", async () => {
    const tenant = await createTenant(db);
    const job = (i: number, model: string) => insertJob(repo, smallJob(tenant, model, `m ${i}`));
    const a = [await job(0, 'model-a'), await job(1, 'model-a'), await job(2, 'model-a')];
    const b = await job(3, 'model-b');
    expect(a.map((j) => j.queuePriority)).toEqual([1, 2, 3]);
    expect(b.queuePriority).toBe(1);
    // The reconciler agrees: nothing to correct.
    const left = await repo.unfairPriorities(10_000);
    expect(left.filter((m) => [...a, b].some((j) => j.id === m.id))).toEqual([]);
  });

  it('agrees with admission on jobs admitted by one statement (one created_at): nothing to correct, whatever their ids', async () => {
    const tenant = await createTenant(db);
    const batch = Array.from({ length: 12 }, (_, i) => ({ ...smallJob(tenant, TEST_MODEL, `batch ${i}`), pixelSteps: 64 * 64 }));
    const admitted = await repo.createMany(batch, { maxInFlight: 0, dailyPixelSteps: 0 });
    const records = admitted.map((r) => ('record' in r ? r.record : null));
    expect(records.map((r) => r?.queuePriority)).toEqual(batch.map((_, i) => i + 1));
    expect(new Set(records.map((r) => r?.createdAt.getTime())).size).toBe(1);
    const left = await repo.unfairPriorities(10_000);
    expect(left.filter((m) => batch.some((j) => j.id === m.id))).toEqual([]);
  });
});

/** A one-step 64 x 64 job of `tenantId` on `model`, with a fresh id. */
function smallJob(tenantId: string, model: string, prompt: string) {
  return { id: randomUUID(), tenantId, model, prompt, negativePrompt: null, numSteps: 1, guidanceScale: 9, seed: 1, width: 64, height: 64, scheduler: 'pndm' };
}
