import { hostname } from 'node:os';
import path from 'node:path';
import { createPrismaClient } from '../adapters/db/client.js';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createJobEventStore, eventSink } from '../adapters/job-events.js';
import { webhookClientFromConfig } from '../adapters/webhook-http.js';
import { createSigner } from '../adapters/webhook-signing.js';
import { createWebhookRepo } from '../adapters/webhooks-repo.js';
import { createFleetRegistry } from '../adapters/fleet.js';
import { modelTasks, type FleetMember } from '../core/fleet.js';
import { isModelName, queueNameFor } from '../core/jobs.js';
import { imageSeed, SD_DEFAULTS } from '../engine/params.js';
import { imageJson } from '../core/image-json.js';
import { siblingImageKey } from '../core/images.js';
import { createWebhookDispatcher } from '../core/webhooks.js';
import { encodePreviewWebp } from '../engine/png.js';
import { checkRedis, createConsumer, createProducer, UnrecoverableError } from '../adapters/queue.js';
import { createErrorReporter } from '../adapters/sentry.js';
import { createStorage, objectKeyFor } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { withTimeout } from '../core/lifecycle.js';
import { createProcessLogger, type Logger } from '../core/logger.js';
import { failureFromQueueReason } from '../core/failures.js';
import { packageVersion, type ErrorReporter } from '../core/reporting.js';
import { eventStoreOptions, queueSettings, storageOptions } from '../core/wiring.js';
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

/** A worker's announcement of its model lives this long unless renewed (every third of it). */
const FLEET_TTL_MS = 30_000;
/** Leaving the fleet at shutdown is a courtesy (the announcement expires anyway): never wait long for it. */
const FLEET_WITHDRAW_TIMEOUT_MS = 2_000;

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
  const modelName = config.MODEL_NAME ?? (overrides.testEngine ? 'test-engine' : path.basename(engine.info.modelDir));
  if (!isModelName(modelName)) {
    await engine.close();
    throw new Error(`the model's folder name "${modelName.slice(0, 80)}" cannot name a model (letters, digits, ".", "_" and "-", at most 64): set MODEL_NAME`);
  }
  // What the engine can batch (an export with a fixed batch cannot), not what was asked for, per session.
  const batchMax = engine.info.batching.max;
  const concurrency = config.ENGINE_SESSIONS * (batchMax > 1 ? 2 * batchMax : 1);
  // What a request that leaves parameters out gets here: announced to the API (which fills them
  // in at submit) and used for jobs submitted before any worker of this model had announced them.
  const defaults = engine.info.defaults ?? SD_DEFAULTS;
  const scheduler = engine.info.defaultScheduler ?? defaults.scheduler ?? 'pndm';
  const tasks = modelTasks(engine.info.inputs ?? { family: 'sd', inpainting: false, imageInputs: false });
  logger.info(
    {
      model: modelName,
      variant: engine.info.variant ?? null,
      queue: queueNameFor(config.QUEUE_NAME, modelName),
      defaults: {
        steps: defaults.numSteps,
        guidance: defaults.guidanceScale,
        size: `${defaults.width}x${defaults.height}`,
        scheduler,
        strength: defaults.strength,
      },
      tasks,
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
    variant: engine.info.variant ?? 'unknown',
    schedulers: SCHEDULER_NAMES,
    provider: engine.info.provider,
    version: packageVersion(),
    loadSeconds: engine.info.loadMs / 1000,
  });
  // Queue depth for t2i_queue_jobs, read on each scrape through a fail-fast connection of its own;
  // the reconciler uses it too.
  const settings = queueSettings(config);
  const queue = createProducer(config.REDIS_URL, settings);
  metrics.watchQueue(() => queue.counts(modelName), QUEUE_COUNTS_TIMEOUT_MS);

  const db = createPrismaClient(config.DATABASE_URL, { poolMax: 3, log: (level, msg) => logger[level]({}, msg) });
  const storage = createStorage(storageOptions(config));
  await Promise.all([storage.ensureBucket(), queue.ready()]);
  const repo = createImagesRepo(db);
  const eventStore = createJobEventStore(config.REDIS_URL, eventStoreOptions(config));
  // The first WebP encode initialises libvips' codec (tens of ms): pay it now, not on a job's first preview.
  if (config.PREVIEW_INTERVAL_MS > 0) await encodePreviewWebp(new Uint8Array(8 * 8 * 3), 8, 8);
  const events = eventSink(eventStore, logger);
  const process_ = createProcessor({
    repo,
    storage,
    engine,
    events,
    ...(config.PREVIEW_INTERVAL_MS > 0 ? { previews: { intervalMs: config.PREVIEW_INTERVAL_MS, encode: encodePreviewWebp } } : {}),
    objectKeyFor,
    workerId,
    modelName,
    runDefaults: { numSteps: defaults.numSteps, guidanceScale: defaults.guidanceScale, width: defaults.width, height: defaults.height, scheduler },
    maxPixelSteps: config.MAX_PIXEL_STEPS,
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
    modelName,
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
    const f = failureFromQueueReason(err.message);
    void repo.failAny(job.data.imageId, f).then(
      (changed) => changed && void events.publish(job.data.imageId, { type: 'failed', error: f }),
      (e: unknown) => logger.warn({ err: e }, 'could not mark a failed job'),
    );
  });
  void consumer.worker.run();

  const reconciler = createReconciler({
    repo,
    queue,
    events,
    log: logger.child({ component: 'reconciler' }),
    model: modelName,
    queuedGraceMs: config.RECONCILE_QUEUED_AFTER_MS,
    // A running job writes progress (updated_at) at least every few seconds; one silent for
    // several lock periods has lost its worker, or its queue entry.
    runningGraceMs: Math.max(60_000, 4 * config.JOB_LOCK_MS),
  });
  reconciler.start(config.RECONCILE_INTERVAL_MS);
  const sweeper = createSweeper({ repo, storage, log: logger.child({ component: 'sweeper' }), retentionDays: config.RETENTION_DAYS });
  sweeper.start(config.SWEEP_INTERVAL_MS);

  // Webhooks: sent only by workers that have the signing secret (API and workers share it).
  const dispatcher = config.WEBHOOK_SECRET
    ? createWebhookDispatcher({
        repo: createWebhookRepo(db),
        sender: webhookClientFromConfig(config, `t2i-webhooks/${packageVersion()}`),
        sign: createSigner(config.WEBHOOK_SECRET),
        buildData: async (imageId) => {
          const record = await repo.get(imageId);
          if (!record) return { id: imageId };
          const data: Record<string, unknown> = imageJson(record);
          if (record.status === 'succeeded' && record.fileName) {
            const images = [];
            for (let k = 0; k < record.numImages; k++) {
              const { url, expiresAt } = await storage.presignGet(siblingImageKey(record.fileName, k));
              images.push({ index: k, seed: imageSeed(record.seed, k), url, expires_at: expiresAt.toISOString() });
            }
            Object.assign(data, { url: images[0]!.url, expires_at: images[0]!.expires_at, images });
          }
          return data;
        },
        maxAttempts: config.WEBHOOK_MAX_ATTEMPTS,
        backoffMs: config.WEBHOOK_BACKOFF_MS,
        maxBackoffMs: 6 * 3600 * 1000,
        concurrency: 8,
        log: logger.child({ component: 'webhooks' }),
      })
    : undefined;
  dispatcher?.start(config.WEBHOOK_POLL_MS);

  // What this worker serves, for GET /models and /schedulers on the API: renewed well within its time to live.
  const fleet = createFleetRegistry(config.REDIS_URL, config.QUEUE_NAME);
  const member: FleetMember = {
    workerId,
    model: modelName,
    variant: engine.info.variant ?? null,
    provider: engine.info.provider,
    defaults: {
      num_steps: defaults.numSteps,
      guidance_scale: defaults.guidanceScale,
      width: defaults.width,
      height: defaults.height,
      scheduler,
      strength: defaults.strength,
    },
    tasks,
    schedulers: SCHEDULER_NAMES,
    since: new Date().toISOString(),
  };
  const announce = () => fleet.announce(member, FLEET_TTL_MS).catch((err: unknown) => logger.warn({ err }, 'could not announce this worker to the fleet'));
  await announce();
  const announcer = setInterval(() => void announce(), FLEET_TTL_MS / 3);
  announcer.unref();

  const health = buildHealthApp({
    registry: metrics.registry,
    metricsToken: config.METRICS_TOKEN,
    logger,
    engineProblem: () => (engine.ready ? null : 'restarting'),
    checks: { postgres: () => repo.ping(), redis: () => queue.ping(), storage: () => storage.ping() },
  });
  const address = await health.listen({ host: config.WORKER_METRICS_HOST, port: config.WORKER_METRICS_PORT });
  const metricsUrl = address.replace('0.0.0.0', '127.0.0.1');
  logger.info({ metricsUrl, model: modelName }, 'worker ready');

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
          // Alongside the consumer, within its time: a webhook send cut short is sent again once
          // its lease lapses, and an announcement that is not withdrawn expires by itself.
          ...(await Promise.allSettled([
            withTimeout(consumer.close(config.SHUTDOWN_GRACE_MS), config.SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUTS_MS.release, 'closing the queue consumer'),
            withTimeout(dispatcher?.stop() ?? Promise.resolve(), config.SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUTS_MS.release, 'stopping webhook deliveries'),
            (async () => {
              clearInterval(announcer);
              await withTimeout(fleet.withdraw(workerId), FLEET_WITHDRAW_TIMEOUT_MS, 'leaving the fleet').finally(() => fleet.close());
            })(),
          ])),
          ...(await Promise.allSettled([
            withTimeout(engine.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the engine'),
            withTimeout(db.$disconnect(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'disconnecting from Postgres'),
            withTimeout(queue.close(), SHUTDOWN_TIMEOUTS_MS.cleanup, 'closing the queue connection'),
            withTimeout(
              events.flush().then(() => eventStore.close()),
              SHUTDOWN_TIMEOUTS_MS.cleanup,
              'publishing the last job events',
            ),
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
