import { hostname } from 'node:os';
import path from 'node:path';
import { createServer, type Server } from 'node:http';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createConsumer, UnrecoverableError } from '../adapters/queue.js';
import { createStorage, objectKeyFor } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { createPrismaClient } from '../core/db/client.js';
import { createLogger } from '../core/logger.js';
import { queueSettings, storageOptions } from '../core/wiring.js';
import { Engine } from '../engine/thread/engine-host.js';
import { createProcessor } from './processor.js';

/**
 * Boots a worker process: loads the model once (before taking any job, as the textbook's
 * Dramatiq middleware did), then consumes one job at a time.
 */

export interface RunningWorker {
  workerId: string;
  metricsUrl: string;
  close(): Promise<void>;
}

export async function startWorker(config: Config = loadConfig(process.env, 'worker')): Promise<RunningWorker> {
  const workerId = config.WORKER_ID ?? `${hostname()}:${process.pid}`;
  const logger = createLogger({ level: config.LOG_LEVEL, pretty: config.LOG_PRETTY, name: 'worker' }).child({ workerId });
  const modelDir = path.resolve(config.MODEL_DIR!);
  const engine = await Engine.start({
    modelDir,
    provider: config.EXECUTION_PROVIDER,
    ...(config.ORT_THREADS ? { threads: config.ORT_THREADS } : {}),
    log: (level, msg) => logger[level]({ component: 'engine' }, msg),
  });
  logger.info({ modelDir, provider: engine.info.provider, loadMs: Math.round(engine.info.loadMs) }, 'model loaded');

  const db = createPrismaClient(config.DATABASE_URL, { poolMax: 3, log: (level, msg) => logger[level]({}, msg) });
  const storage = createStorage(storageOptions(config));
  await storage.ensureBucket();
  const repo = createImagesRepo(db);
  const process_ = createProcessor({
    repo,
    storage,
    engine,
    objectKeyFor,
    workerId,
    modelName: path.basename(modelDir),
    progressIntervalMs: config.PROGRESS_INTERVAL_MS,
    log: logger,
    unrecoverable: (m) => new UnrecoverableError(m),
  });
  const consumer = createConsumer(
    config.REDIS_URL,
    queueSettings(config),
    async (job) => {
      const log = logger.child({ jobId: job.id, attempt: job.attempt });
      await process_({ imageId: job.imageId, attempt: job.attempt, maxAttempts: job.maxAttempts, log });
    },
    (err) => logger.error({ err }, 'queue error'),
  );
  void consumer.worker.run();

  const server: Server = createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(engine.alive ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify({ status: engine.alive ? 'ok' : 'engine down' }));
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
    async close() {
      await consumer.close();
      await Promise.allSettled([engine.close(), db.$disconnect(), new Promise((r) => server.close(r))]);
    },
  };
}
