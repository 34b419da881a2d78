import { hostname } from 'node:os';
import path from 'node:path';
import { createServer, type Server } from 'node:http';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createConsumer, createProducer, UnrecoverableError } from '../adapters/queue.js';
import { createErrorReporter } from '../adapters/sentry.js';
import { createStorage, objectKeyFor } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { hasBearer } from '../core/bearer.js';
import { createProcessLogger, type Logger } from '../core/logger.js';
import { packageVersion, type ErrorReporter } from '../core/reporting.js';
import { queueSettings, storageOptions } from '../core/wiring.js';
import { SCHEDULER_NAMES } from '../engine/schedulers/types.js';
import { SyntheticEngine } from '../engine/synthetic.js';
import { Engine } from '../engine/thread/engine-host.js';
import { checkRedis } from '../adapters/queue.js';
import { readiness, withTimeout } from '../core/lifecycle.js';
import { createReconciler } from './reconciler.js';
import { createWorkerMetrics } from './metrics.js';
import { createProcessor } from './processor.js';
import { SHUTDOWN_TIMEOUTS_MS } from './shutdown.js';
import { resolveModelDir } from './model-source.js';

/**
 * Boots a worker process: loads the model once (before taking any job, as the textbook's
 * Dramatiq middleware did), then consumes one job at a time.
 */

export interface RunningWorker {
  workerId: string;
  metricsUrl: string;
  logger: Logger;
  reporter: ErrorReporter;
  close(): Promise<void>;
}

/** What a caller may give instead of what the configuration would make (tests capture logs). */
export interface WorkerOverrides {
  logger?: Logger;
  reporter?: ErrorReporter;
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
  const engine =
    config.ENGINE === 'synthetic'
      ? new SyntheticEngine({ stepMs: config.SYNTHETIC_STEP_MS })
      : await Engine.start({
          modelDir: await resolveModelDir(config, logger),
          provider: config.EXECUTION_PROVIDER,
          ...(config.ORT_THREADS ? { threads: config.ORT_THREADS } : {}),
          log: (level, msg) => logger[level]({ component: 'engine' }, msg),
        });
  const modelName = path.basename(engine.info.modelDir);
  logger.info(
    { modelDir: engine.info.modelDir, engine: config.ENGINE, provider: engine.info.provider, loadMs: Math.round(engine.info.loadMs) },
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
    log: logger,
    unrecoverable: (m) => new UnrecoverableError(m),
    metrics: metrics.job,
    reporter,
  });
  const consumer = createConsumer(
    config.REDIS_URL,
    queueSettings(config),
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
  );
  // A job the queue gave up on without our handler deciding (it stalled too often) still has
  // a row that says running: record the reason now rather than at the next reconcile.
  consumer.worker.on('failed', (job, err) => {
    if (!job || !job.finishedOn) return;
    void repo.failAny(job.data.imageId, err.message).catch((e: unknown) => logger.warn({ err: e }, 'could not mark a failed job'));
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

  const server: Server = createServer((req, res) => {
    if (req.url === '/metrics' && req.method === 'GET') {
      if (config.METRICS_TOKEN && !hasBearer(req.headers.authorization, config.METRICS_TOKEN)) {
        res.writeHead(401, { 'www-authenticate': 'Bearer realm="metrics"' }).end();
        return;
      }
      metrics.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        (err: unknown) => {
          logger.error({ err }, 'metrics collection failed');
          res.writeHead(500).end();
        },
      );
      return;
    }
    if (req.url === '/healthz') {
      res.writeHead(engine.alive ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify({ status: engine.alive ? 'ok' : 'engine down' }));
      return;
    }
    if (req.url === '/readyz') {
      void readiness({
        model: async () => {
          if (!engine.alive) throw new Error('engine down');
        },
        postgres: () => repo.ping(),
        redis: async () => void (await queue.counts()),
        storage: () => storage.ping(),
      }).then(({ ok, checks }) =>
        res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify({ status: ok ? 'ready' : 'not ready', checks })),
      );
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((resolve) => server.listen(config.WORKER_METRICS_PORT, config.WORKER_METRICS_HOST, resolve));
  const addr = server.address();
  const metricsUrl = `http://${config.WORKER_METRICS_HOST}:${typeof addr === 'object' && addr ? addr.port : config.WORKER_METRICS_PORT}`;
  logger.info({ metricsUrl }, 'worker ready');

  return {
    workerId,
    metricsUrl,
    logger,
    reporter,
    async close() {
      // Stop taking jobs; let the current one finish within the grace period, then hand it back.
      logger.info({ graceMs: config.SHUTDOWN_GRACE_MS }, 'shutting down');
      await reconciler.stop();
      await withTimeout(consumer.close(config.SHUTDOWN_GRACE_MS), config.SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUTS_MS.release, 'closing the queue consumer');
      // Every cleanup runs even if one fails or hangs (Redis or Postgres unreachable).
      const results = await Promise.allSettled([
        withTimeout(engine.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the engine'),
        withTimeout(db.$disconnect(), 5_000, 'disconnecting from Postgres'),
        withTimeout(queue.close(), 5_000, 'closing the queue connection'),
        new Promise((r) => server.close(r)),
        // A reporter the caller gave stays the caller's to close.
        overrides.reporter ? reporter.flush() : reporter.close(),
      ]);
      for (const r of results) if (r.status === 'rejected') logger.warn({ err: r.reason }, 'shutdown step failed');
      logger.info({}, 'worker stopped');
    },
  };
}
