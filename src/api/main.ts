import { createImagesRepo } from '../adapters/images-repo.js';
import { createJobEventStore, eventSink } from '../adapters/job-events.js';
import { followJob } from '../core/job-event-stream.js';
import { webhookClientFromConfig } from '../adapters/webhook-http.js';
import { createWebhookRepo } from '../adapters/webhooks-repo.js';
import { createFleetRegistry } from '../adapters/fleet.js';
import { servedModels } from '../core/fleet.js';
import { checkRedis, createProducer } from '../adapters/queue.js';
import { withTimeout } from '../core/lifecycle.js';
import { createErrorReporter } from '../adapters/sentry.js';
import { createStorage } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { ImagesService } from '../core/images.js';
import { createProcessLogger, type Logger } from '../core/logger.js';
import type { ErrorReporter } from '../core/reporting.js';
import { eventStoreOptions, queueSettings, storageOptions } from '../core/wiring.js';
import { buildApp } from './app.js';
import { createApiMetrics } from './metrics.js';

/** Boots the API process: configuration, clients, the app, listen, and an orderly close. */

export interface RunningApi {
  url: string;
  logger: Logger;
  reporter: ErrorReporter;
  close(): Promise<void>;
}

/** What a caller may give instead of what the configuration would make (tests capture logs). */
export interface ApiOverrides {
  logger?: Logger;
  reporter?: ErrorReporter;
}

export async function startApi(config: Config = loadConfig(process.env, 'api'), overrides: ApiOverrides = {}): Promise<RunningApi> {
  const logger = overrides.logger ?? (await createProcessLogger(config, 'api'));
  const reporter = overrides.reporter ?? createErrorReporter(config, 'api');
  // Refuse to run on a Redis that may evict queue keys.
  await checkRedis(config.REDIS_URL);
  const db = createPrismaClient(config.DATABASE_URL, { poolMax: config.DATABASE_POOL_MAX, log: (level, msg) => logger[level]({}, msg) });
  const producer = createProducer(config.REDIS_URL, queueSettings(config));
  const storage = createStorage(storageOptions(config));
  await Promise.all([storage.ensureBucket(), producer.ready()]);
  const repo = createImagesRepo(db);
  const eventStore = createJobEventStore(config.REDIS_URL, eventStoreOptions(config));
  const events = eventSink(eventStore, logger);
  const webhookClient = config.WEBHOOK_SECRET ? webhookClientFromConfig(config, 't2i') : undefined;
  const images = new ImagesService({
    repo,
    queue: producer,
    storage,
    maxQueueDepth: config.MAX_QUEUE_DEPTH,
    maxPixelSteps: config.MAX_PIXEL_STEPS,
    log: logger,
    events,
    // The same check a send makes, so a refused URL is a 400 now rather than a failed delivery later.
    ...(webhookClient ? { checkWebhookUrl: (url: string) => webhookClient.check(url) } : {}),
  });
  const follow = (id: string, lastEventId: string | null) =>
    followJob(
      {
        log: eventStore.log,
        getJob: (jobId) => images.get(jobId),
        result: (record) => images.result(record),
        position: (jobId) => producer.position(jobId),
        logger,
      },
      id,
      lastEventId,
    );
  const fleet = createFleetRegistry(config.REDIS_URL, config.QUEUE_NAME);
  const models = async () => servedModels(await withTimeout(fleet.members(), 2_000, 'reading the fleet'));
  const app = buildApp({
    images,
    logger,
    bodyLimit: config.BODY_LIMIT_BYTES,
    metrics: createApiMetrics(),
    metricsToken: config.METRICS_TOKEN,
    reporter,
    checks: { postgres: () => repo.ping(), redis: async () => void (await producer.counts()), storage: () => storage.ping() },
    webhooks: { deliveries: createWebhookRepo(db) },
    events: { heartbeatMs: config.EVENTS_HEARTBEAT_MS, follow },
    openai: { follow: (id) => follow(id, null), readImage: (key) => storage.read(key), models, waitMs: config.OPENAI_WAIT_MS },
    discovery: { models, maxPixelSteps: config.MAX_PIXEL_STEPS },
  });
  app.addHook('onClose', async () => {
    // A reporter the caller gave stays the caller's to close.
    // Bounded, so a Redis or Postgres that went away cannot hold the process open.
    await Promise.allSettled([
      withTimeout(producer.close(), 5_000, 'closing the queue connection'),
      Promise.resolve(fleet.close()),
      withTimeout(
        events.flush().then(() => eventStore.close()),
        5_000,
        'closing the event connections',
      ),
      withTimeout(db.$disconnect(), 5_000, 'disconnecting from Postgres'),
      overrides.reporter ? undefined : reporter.close(),
    ]);
  });
  const url = await app.listen({ host: config.HOST, port: config.PORT });
  logger.info({ url }, 'api listening');
  return { url, logger, reporter, close: () => app.close() };
}
