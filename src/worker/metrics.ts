import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { JobMetrics, MetricOutcome } from './processor.js';

/**
 * The worker's Prometheus metrics (GET /metrics on WORKER_METRICS_PORT). One Registry per worker,
 * not prom-client's global one, so tests can run several workers in one process. Once the model
 * is loaded, every series carries a `model` label (the registry's default label): a worker serves
 * one model, and dashboards, alerts and autoscaling break the fleet down by it.
 */

export const QUEUE_STATES = ['waiting', 'active', 'delayed', 'failed'] as const;

/** Seconds; a job is a few seconds on a GPU and minutes on a CPU. */
export const JOB_DURATION_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200];
/** Seconds from submission to a worker starting the job: instant when idle, long under a backlog. */
export const QUEUE_WAIT_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200];
/** Seconds per denoising step: milliseconds for test models, tenths on a GPU, seconds on a CPU. */
export const STEP_DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30];

const OUTCOMES: MetricOutcome[] = ['succeeded', 'failed', 'retried', 'canceled', 'skipped', 'superseded', 'released'];

export interface WorkerMetrics {
  registry: Registry;
  /** What the processor records through (its `metrics` collaborator). */
  job: JobMetrics;
  /** t2i_worker_info and the model load time, once the model is loaded. */
  setModel(info: { model: string; variant: string; schedulers: readonly string[]; provider: string; version: string; loadSeconds: number }): void;
  /** The engine went down (thread died, ran out of heap, or hung): counted, and t2i_engine_up drops to 0. */
  engineDown(reason: string): void;
  /** A restarted engine is up again. */
  engineUp(): void;
  /** Reads queue depth from BullMQ on each scrape, giving up after timeoutMs (the series are then absent). */
  watchQueue(counts: () => Promise<Partial<Record<string, number>>>, timeoutMs: number): void;
}

export function createWorkerMetrics(): WorkerMetrics {
  const registry = new Registry();
  const registers = [registry];
  collectDefaultMetrics({ register: registry });

  const finished = new Counter({
    name: 't2i_jobs_finished_total',
    help: 'Jobs this worker finished, by outcome: succeeded, failed (for good), canceled, skipped (no longer pending), superseded (another attempt owned it), released (handed back at shutdown).',
    labelNames: ['outcome'],
    registers,
  });
  const retries = new Counter({ name: 't2i_job_retries_total', help: 'Attempts that failed and were handed back to the queue for a retry.', registers });
  const duration = new Histogram({
    name: 't2i_job_duration_seconds',
    help: 'Duration of each attempt on this worker, from taking the job to its outcome (succeeded, failed, retried, canceled, skipped, superseded, released).',
    labelNames: ['outcome'],
    buckets: JOB_DURATION_BUCKETS,
    registers,
  });
  const queueWait = new Histogram({
    name: 't2i_job_queue_wait_seconds',
    help: 'Time from submission to a worker starting the first attempt.',
    buckets: QUEUE_WAIT_BUCKETS,
    registers,
  });
  const inProgress = new Gauge({ name: 't2i_jobs_in_progress', help: 'Jobs this worker is running now (0 or 1).', registers });
  const step = new Histogram({
    name: 't2i_denoise_step_duration_seconds',
    help: 'Duration of one denoising step (UNet runs and scheduler).',
    buckets: STEP_DURATION_BUCKETS,
    registers,
  });
  const modelLoad = new Gauge({ name: 't2i_model_load_duration_seconds', help: 'How long this worker took to load its model at start.', registers });
  const info = new Gauge({
    name: 't2i_worker_info',
    help: 'Always 1; the labels say which model (and the variant loading found), schedulers, execution provider and version this worker runs.',
    labelNames: ['variant', 'schedulers', 'provider', 'version'],
    registers,
  });

  const engineRestarts = new Counter({
    name: 't2i_engine_restarts_total',
    help: 'Times the engine went down and was restarted, by reason: crashed (its thread died), out_of_memory, stalled (a generation made no progress for ENGINE_STALL_MS).',
    labelNames: ['reason'],
    registers,
  });
  const engineUpGauge = new Gauge({ name: 't2i_engine_up', help: '1 while the engine can take jobs, 0 while it is being restarted.', registers });
  engineUpGauge.set(1);
  for (const reason of ['crashed', 'out_of_memory', 'stalled']) engineRestarts.inc({ reason }, 0);

  // Series exist at 0 from the start, so rates and ratios are defined before the first event.
  for (const outcome of OUTCOMES) {
    duration.zero({ outcome });
    if (outcome !== 'retried') finished.inc({ outcome }, 0);
  }

  return {
    registry,
    job: {
      started(queueWaitSeconds) {
        inProgress.inc();
        if (queueWaitSeconds !== undefined) queueWait.observe(Math.max(0, queueWaitSeconds));
      },
      step(seconds) {
        step.observe(seconds);
      },
      finished(outcome, seconds) {
        inProgress.dec();
        duration.observe({ outcome }, seconds);
        if (outcome === 'retried') retries.inc();
        else finished.inc({ outcome });
      },
    },
    engineDown(reason) {
      engineRestarts.inc({ reason });
      engineUpGauge.set(0);
    },
    engineUp() {
      engineUpGauge.set(1);
    },
    setModel(m) {
      registry.setDefaultLabels({ model: m.model });
      info.reset();
      info.set({ variant: m.variant, schedulers: [...m.schedulers].join(','), provider: m.provider, version: m.version }, 1);
      modelLoad.set(m.loadSeconds);
    },
    watchQueue(counts, timeoutMs) {
      // A registry collects its metrics concurrently: a miss is counted by the next scrape.
      const queueErrors = new Counter({
        name: 't2i_queue_counts_errors_total',
        help: 'Scrapes on which queue depth could not be read from Redis in time.',
        registers,
      });
      new Gauge({
        name: 't2i_queue_jobs',
        help: "Jobs in this worker's model's queue by state (waiting, active, delayed, failed), read from Redis on each scrape; every worker of a model reports the same queue, so aggregate with max by (model).",
        labelNames: ['state'],
        registers,
        async collect() {
          let timer: NodeJS.Timeout | undefined;
          try {
            const c = await Promise.race([
              counts(),
              new Promise<never>((_, reject) => {
                timer = setTimeout(() => reject(new Error(`queue counts took over ${timeoutMs} ms`)), timeoutMs);
              }),
            ]);
            // BullMQ keeps prioritized jobs apart from waiting ones; both are waiting to a user.
            for (const state of QUEUE_STATES) this.set({ state }, (c[state] ?? 0) + (state === 'waiting' ? (c.prioritized ?? 0) : 0));
          } catch {
            // Absent rather than stale: a scrape must not report counts it could not read.
            this.reset();
            queueErrors.inc();
          } finally {
            clearTimeout(timer);
          }
        },
      });
    },
  };
}
