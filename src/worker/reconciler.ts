import type { ImageRecord, ImagesRepo } from '../core/images.js';
import type { ProducerQueue } from '../adapters/queue.js';
import { failureFromQueueReason } from '../core/failures.js';
import type { JobEventSink } from '../core/job-events.js';
import { IDEMPOTENCY_TTL_MS } from '../core/idempotency.js';

/**
 * Makes Postgres and the queue agree again after anything that split them: Redis down while a
 * POST committed its row, Redis restarted without its data, a worker killed between steps, a
 * job BullMQ gave up on (stalled too often) while its row still said running.
 *
 * It looks only at rows that have not changed for a while (a live job writes progress, which
 * bumps updated_at), asks BullMQ for the job's state and repairs:
 *
 *   row queued,  no job in Redis          -> enqueue it again (same id: idempotent)
 *   row queued,  job completed            -> remove the stale job, enqueue again
 *   row running, no job in Redis          -> enqueue again (the next attempt takes it over)
 *   row queued or running, job failed     -> mark the row failed with the queue's reason
 *   anything else (waiting, active, delayed) is in flight and left alone.
 *
 * It also keeps scheduling fair (docs/operations.md "Fair scheduling"): a job is queued with
 * priority = its rank among its tenant's jobs in flight, and ranks fall as that tenant's earlier
 * jobs finish. Each pass gives every queued job whose rank changed its current rank (front of
 * each tenant's line first), so a tenant with a long backlog keeps taking turns with newcomers
 * instead of being pushed behind them.
 *
 * Each row's job is looked for on the queue of the row's model, whichever model this worker
 * serves: a model with no worker (scaled to zero) keeps its jobs queued, so that its first worker
 * finds them. A row from before models had names (model null) is given to this worker's model
 * and enqueued on its queue.
 *
 * Every worker may run one; all repairs are idempotent or conditional, so several can overlap.
 * Each pass also deletes Idempotency-Keys past their 24 hours (they no longer hold anyway).
 */

export interface ReconcilerDeps {
  repo: ImagesRepo;
  queue: Pick<ProducerQueue, 'jobState' | 'enqueue' | 'remove' | 'changePriority'>;
  log: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void };
  /** This worker's model: rows without one (from before models had names) are given to it. */
  model: string;
  /** Where a job it fails is announced to live streams; nowhere when absent. */
  events?: JobEventSink;
  /** A queued row untouched this long is checked. */
  queuedGraceMs: number;
  /** A running row untouched this long is checked (more than a lock period plus a step). */
  runningGraceMs: number;
  batch?: number;
  /** Most priorities corrected per pass. */
  priorityBatch?: number;
}

export interface ReconcileSummary {
  checked: number;
  requeued: number;
  failed: number;
  /** Queued jobs moved to their tenant rank's priority. */
  reprioritized: number;
}

export function createReconciler(deps: ReconcilerDeps) {
  async function repair(row: ImageRecord, summary: ReconcileSummary): Promise<void> {
    if (row.model === null) {
      // Its job (if any) is on the queue of before, which no worker consumes any more.
      if (!(await deps.repo.assignModel(row.id, deps.model))) return;
      await deps.queue.enqueue(deps.model, row.id, row.queuePriority);
      summary.requeued++;
      deps.log.warn({ imageId: row.id, model: deps.model }, "reconciler: job without a model given to this worker's model and enqueued");
      return;
    }
    const model = row.model;
    const job = await deps.queue.jobState(model, row.id);
    if (!job) {
      await deps.queue.enqueue(model, row.id, row.queuePriority);
      summary.requeued++;
      deps.log.warn({ imageId: row.id, status: row.status }, 'reconciler: job missing from the queue; enqueued again');
      return;
    }
    if (job.state === 'failed') {
      const f = failureFromQueueReason(job.failedReason);
      if (await deps.repo.failAny(row.id, f)) {
        void deps.events?.publish(row.id, { type: 'failed', error: f });
        summary.failed++;
        deps.log.warn({ imageId: row.id, reason: job.failedReason }, 'reconciler: queue failed the job; row marked failed');
      }
      return;
    }
    if (job.state === 'completed' && row.status === 'queued') {
      if (await deps.queue.remove(model, row.id)) {
        await deps.queue.enqueue(model, row.id, row.queuePriority);
        summary.requeued++;
        deps.log.warn({ imageId: row.id }, 'reconciler: queue had completed a job whose row is still queued; enqueued again');
      }
    }
  }

  async function runOnce(now = new Date()): Promise<ReconcileSummary> {
    const summary: ReconcileSummary = { checked: 0, requeued: 0, failed: 0, reprioritized: 0 };
    const rows = await deps.repo.findStale({
      queuedBefore: new Date(now.getTime() - deps.queuedGraceMs),
      runningBefore: new Date(now.getTime() - deps.runningGraceMs),
      limit: deps.batch ?? 100,
    });
    for (const row of rows) {
      summary.checked++;
      await repair(row, summary);
    }
    for (const { id, model, priority } of await deps.repo.unfairPriorities(deps.priorityBatch ?? 1_000)) {
      // The queue first: the row records what the queue has. A job that is gone or already
      // running keeps its row as it is (the repairs above handle missing jobs).
      if (await deps.queue.changePriority(model, id, priority)) {
        await deps.repo.setPriority(id, priority);
        summary.reprioritized++;
      }
    }
    await deps.repo.sweepIdempotencyKeys(new Date(now.getTime() - IDEMPOTENCY_TTL_MS));
    return summary;
  }

  let timer: NodeJS.Timeout | undefined;
  let running: Promise<unknown> = Promise.resolve();
  return {
    runOnce,
    /** Runs every intervalMs until stop(); errors (Redis or Postgres down) are logged and retried next time. */
    start(intervalMs: number) {
      timer = setInterval(() => {
        running = running.then(() =>
          runOnce().then(
            (s) => s.requeued + s.failed + s.reprioritized > 0 && deps.log.info(s, 'reconciler repaired jobs'),
            (err: unknown) => deps.log.warn({ err }, 'reconciler pass failed'),
          ),
        );
      }, intervalMs);
      timer.unref();
    },
    async stop() {
      if (timer) clearInterval(timer);
      await running;
    },
  };
}
