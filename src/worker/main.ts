import { hostname } from 'node:os';
import path from 'node:path';
import { createPrismaClient } from '../adapters/db/client.js';
import { createImagesRepo } from '../adapters/images-repo.js';
import { checkRedis, createConsumer, createProducer, UnrecoverableError } from '../adapters/queue.js';
import { createErrorReporter } from '../adapters/sentry.js';
import { createStorage, objectKeyFor } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { withTimeout } from '../core/lifecycle.js';
import { createProcessLogger, type Logger } from '../core/logger.js';
import { failureFromQueueReason } from '../core/failures.js';
import { packageVersion, type ErrorReporter } from '../core/reporting.js';
import { queueSettings, storageOptions } from '../core/wiring.js';
import { SCHEDULER_NAMES } from '../engine/schedulers/types.js';
import type { TestPipelineOptions } from '../engine/testing/test-pipeline.js';
import { Engine, type EngineOptions } from '../engine/thread/engine-host.js';
import { EnginePool } from '../engine/thread/engine-pool.js';
import { EngineSupervisor } from './engine.js';
import { buildHealthApp } from './health.js';
import { createWorkerMetrics } from './metrics.js';
import { createProcessor } from './processor.js';
import { createReconciler } from './reconciler.js';
import { createSweeper } from './sweeper.js';
import { SHUTDOWN_TIMEOUTS_MS } from './shutdown.js';
import { resolveModelDir } from './model-source.js';

/**
 * Boots a worker process: loads the model once (before taking any job, as the textbook's
 * Dramatiq middleware did), then consumes jobs, each through the processor on its own. With
 * BATCH_MAX above 1 it runs up to twice that many at once: the engine gathers those that can
 * share UNet runs into batches of up to BATCH_MAX, and the other half of the slots lets the next
 * batch gather (claims, prompt encoding) while the last one's images are stored; ENGINE_SESSIONS
 * multiplies that by its sessions. If the engine
 * goes down it stops taking jobs, hands the current ones back, and restarts the engine; if that
 * keeps failing, `fatal` settles and the process should exit (src/cli/service-commands.ts does,
 * with code 1).
 */

export interface RunningWorker {
  workerId: string;
  metricsUrl: string;
  logger: Logger;
  reporter: ErrorReporter;
  /** Resolves with the reason if the worker cannot go on (its engine could not be kept running). */
  fatal: Promise<Error>;
  /** Stops taking jobs, finishes or hands back the active one, and runs every cleanup step; false if a step failed or timed out. */
  close(): Promise<boolean>;
}

/** What a caller may give instead of what the configuration would make. */
export interface WorkerOverrides {
  /** Tests capture logs and reports. */
  logger?: Logger;
  reporter?: ErrorReporter;
  /**
   * Runs the test double (src/engine/testing/test-pipeline.ts) instead of MODEL_DIR's model:
   * chosen by `t2i worker --test-engine` or by tests, never by configuration.
   */
  testEngine?: TestPipelineOptions;
}

/** Longest a scrape waits for queue depth from Redis; Prometheus' own scrape timeout is 10 s by default. */
const QUEUE_COUNTS_TIMEOUT_MS = 1_000;

export async function startWorker(config: Config = loadConfig(process.env, 'worker'), overrides: WorkerOverrides = {}): Promise<RunningWorker> {
  const workerId = config.WORKER_ID ?? `${hostname()}:${process.pid}`;
  const logger = (overrides.logger ?? (await createProcessLogger(config, 'worker'))).child({ workerId });
  const reporter = overrides.reporter ?? createErrorReporter(config, 'worker');
  const metrics = createWorkerMetrics();
  // Refuse to run on a Redis that may evict queue keys, before loading anything heavy.
  await checkRedis(config.REDIS_URL);

  let onFatal: (err: Error) => void = () => undefined;
  const fatal = new Promise<Error>((resolve) => (onFatal = resolve));
  // Set once the consumer exists; the engine cannot go down before it does (no job runs earlier).
  const intake: { consumer?: { pause(): Promise<void>; resume(): Promise<void> } } = {};
  const engineLog = (level: 'debug' | 'info' | 'warn', msg: string) => logger[level]({ component: 'engine' }, msg);
  const batch = { batchMax: config.BATCH_MAX, batchWaitMs: config.BATCH_WAIT_MS };
  const engineOptions: EngineOptions = overrides.testEngine
    ? { test: overrides.testEngine, stallMs: config.ENGINE_STALL_MS, log: engineLog, ...batch }
    : {
        modelDir: await resolveModelDir(config, logger),
        provider: config.EXECUTION_PROVIDER,
        ...(config.ORT_THREADS ? { threads: config.ORT_THREADS } : {}),
        stallMs: config.ENGINE_STALL_MS,
        log: engineLog,
        ...batch,
      };
  const engine = await EngineSupervisor.start({
    start: () => (config.ENGINE_SESSIONS > 1 ? EnginePool.start(engineOptions, config.ENGINE_SESSIONS) : Engine.start(engineOptions)),
    maxRestarts: config.ENGINE_MAX_RESTARTS,
    backoffMs: config.ENGINE_RESTART_BACKOFF_MS,
    log: logger.child({ component: 'engine' }),
    onDown(err) {
      // Stop fetching at once: every job taken now would fail or wait for a model that is not there.
      metrics.engineDown(err.reason);
      void intake.consumer?.pause().catch((e: unknown) => logger.warn({ err: e }, 'could not pause the consumer'));
      logger.error({ reason: err.reason, err: { message: err.message } }, 'engine down; not taking jobs');
      reporter.capture(err, { level: 'error', tags: { workerId, reason: err.reason } });
    },
    onUp(info, restarts) {
      metrics.engineUp();
      logger.info({ restarts, loadMs: Math.round(info.loadMs) }, 'engine restarted; taking jobs again');
      void intake.consumer?.resume();
    },
    onGiveUp(err) {
      onFatal(err);
    },
  });
  const modelName = overrides.testEngine ? 'test-engine' : path.basename(engine.info.modelDir);
  // What the engine can batch (an export with a fixed batch cannot), not what was asked for, per session.
  const batchMax = engine.info.batching.max;
  const concurrency = config.ENGINE_SESSIONS * (batchMax > 1 ? 2 * batchMax : 1);
  logger.info(
    {
      modelDir: engine.info.modelDir,
      provider: engine.info.provider,
      loadMs: Math.round(engine.info.loadMs),
      testEngine: overrides.testEngine !== undefined,
      batchMax,
      sessions: config.ENGINE_SESSIONS,
      concurrency,
    },
    'model loaded',
  );
  metrics.setModel({
    model: modelName,
    schedulers: SCHEDULER_NAMES,
    provider: engine.info.provider,
    version: packageVersion(),
    loadSeconds: engine.info.loadMs / 1000,
  });
  // Queue depth for t2i_queue_jobs, read on each scrape through a fail-fast connection of its own;
  // the reconciler uses it too.
  const settings = queueSettings(config);
  const queue = createProducer(config.REDIS_URL, settings);
  metrics.watchQueue(() => queue.counts(), QUEUE_COUNTS_TIMEOUT_MS);

  const db = createPrismaClient(config.DATABASE_URL, { poolMax: 3, log: (level, msg) => logger[level]({}, msg) });
  const storage = createStorage(storageOptions(config));
  await Promise.all([storage.ensureBucket(), queue.ready()]);
  const repo = createImagesRepo(db);
  const process_ = createProcessor({
    repo,
    storage,
    engine,
    objectKeyFor,
    workerId,
    modelName,
    progressIntervalMs: config.PROGRESS_INTERVAL_MS,
    jobTimeoutMs: config.JOB_TIMEOUT_MS,
    log: logger,
    unrecoverable: (m) => new UnrecoverableError(m),
    metrics: metrics.job,
    reporter,
  });
  const consumer = createConsumer(
    config.REDIS_URL,
    settings,
    async (job) => {
      // Bound once: every line about this job, the engine thread's included, carries its id, attempt and worker id.
      const log = logger.child({ jobId: job.id, attempt: job.attempt });
      await process_({
        imageId: job.imageId,
        jobId: job.id,
        attempt: job.attempt,
        maxAttempts: job.maxAttempts,
        enqueuedAt: job.enqueuedAt,
        log,
        signal: job.signal,
      });
    },
    (err) => logger.error({ err }, 'queue error'),
    concurrency,
  );
  intake.consumer = consumer;
  // A job the queue gave up on without our handler deciding (it stalled too often) still has
  // a row that says running: record the reason now rather than at the next reconcile.
  consumer.worker.on('failed', (job, err) => {
    if (!job?.finishedOn) return;
    void repo.failAny(job.data.imageId, failureFromQueueReason(err.message)).catch((e: unknown) => logger.warn({ err: e }, 'could not mark a failed job'));
  });
  void consumer.worker.run();

  const reconciler = createReconciler({
    repo,
    queue,
    log: logger.child({ component: 'reconciler' }),
    queuedGraceMs: config.RECONCILE_QUEUED_AFTER_MS,
    // A running job writes progress (updated_at) at least every few seconds; one silent for
    // several lock periods has lost its worker, or its queue entry.
    runningGraceMs: Math.max(60_000, 4 * config.JOB_LOCK_MS),
  });
  reconciler.start(config.RECONCILE_INTERVAL_MS);
  const sweeper = createSweeper({ repo, storage, log: logger.child({ component: 'sweeper' }), retentionDays: config.RETENTION_DAYS });
  sweeper.start(config.SWEEP_INTERVAL_MS);

  const health = buildHealthApp({
    registry: metrics.registry,
    metricsToken: config.METRICS_TOKEN,
    logger,
    engineProblem: () => (engine.ready ? null : 'restarting'),
    checks: { postgres: () => repo.ping(), redis: async () => void (await queue.counts()), storage: () => storage.ping() },
  });
  const address = await health.listen({ host: config.WORKER_METRICS_HOST, port: config.WORKER_METRICS_PORT });
  const metricsUrl = address.replace('0.0.0.0', '127.0.0.1');
  logger.info({ metricsUrl }, 'worker ready');

  let closing: Promise<boolean> | undefined;
  return {
    workerId,
    metricsUrl,
    logger,
    reporter,
    fatal,
    close: () =>
      (closing ??= (async () => {
        // Stop taking jobs; let the current one finish within the grace period, then hand it back.
        logger.info({ graceMs: config.SHUTDOWN_GRACE_MS }, 'shutting down');
        // Every step runs even if one before it failed or timed out (Redis or Postgres unreachable);
        // the consumer stops before the clients it uses are closed.
        const results = [
          ...(await Promise.allSettled([
            withTimeout(reconciler.stop(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'stopping the reconciler'),
            withTimeout(sweeper.stop(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'stopping the sweeper'),
          ])),
          ...(await Promise.allSettled([
            withTimeout(consumer.close(config.SHUTDOWN_GRACE_MS), config.SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUTS_MS.release, 'closing the queue consumer'),
          ])),
          ...(await Promise.allSettled([
            withTimeout(engine.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the engine'),
            withTimeout(db.$disconnect(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'disconnecting from Postgres'),
            withTimeout(queue.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the queue connection'),
            withTimeout(health.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the health server'),
            // A reporter the caller gave stays the caller's to close.
            overrides.reporter ? reporter.flush() : reporter.close(),
          ])),
        ];
        const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
        for (const r of failed) logger.warn({ err: r.reason as unknown }, 'shutdown step failed');
        logger.info({ clean: failed.length === 0 }, 'worker stopped');
        return failed.length === 0;
      })()),
  };
}
