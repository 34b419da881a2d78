import { createAccountsRepo } from '../adapters/accounts-repo.js';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createJobEventStore, eventSink } from '../adapters/job-events.js';
import { followJob } from '../core/job-event-stream.js';
import { webhookClientFromConfig } from '../adapters/webhook-http.js';
import { createWebhookRepo } from '../adapters/webhooks-repo.js';
import { createFleetRegistry } from '../adapters/fleet.js';
import { ModelCatalog } from '../core/models.js';
import { checkRedis, createProducer, createRedis } from '../adapters/queue.js';
import { withTimeout } from '../core/lifecycle.js';
import { createErrorReporter } from '../adapters/sentry.js';
import { createStorage } from '../adapters/storage.js';
import { isLoopbackHost, loadConfig, type Config } from '../config.js';
import { AccountsService } from '../core/accounts.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { ImagesService } from '../core/images.js';
import { createProcessLogger, type Logger } from '../core/logger.js';
import type { ErrorReporter } from '../core/reporting.js';
import { eventStoreOptions, queueSettings, storageOptions } from '../core/wiring.js';
import { buildApp } from './app.js';
import { webpThumbnail } from '../adapters/thumbnails.js';
import { findWebDir, loadWebAssets, type WebAssets } from './web.js';
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
  // Also checked by loadConfig for the api role; repeated here for configurations made otherwise.
  if (config.AUTH === 'off' && !isLoopbackHost(config.HOST)) {
    throw new Error(
      `AUTH=off is only allowed when HOST is a loopback address (127.0.0.1, ::1, localhost), not "${config.HOST}": anyone who can reach the API could use it`,
    );
  }
  const logger = overrides.logger ?? (await createProcessLogger(config, 'api'));
  if (config.AUTH === 'off') logger.warn({}, 'AUTH=off: requests need no API key; every caller is the tenant "anonymous"');
  if (!config.METRICS_TOKEN) logger.warn({}, 'METRICS_TOKEN is not set: the API serves no /metrics');
  const reporter = overrides.reporter ?? createErrorReporter(config, 'api');
  // Refuse to run on a Redis that may evict queue keys.
  await checkRedis(config.REDIS_URL);
  const db = createPrismaClient(config.DATABASE_URL, { poolMax: config.DATABASE_POOL_MAX, log: (level, msg) => logger[level]({}, msg) });
  const producer = createProducer(config.REDIS_URL, queueSettings(config));
  const storage = createStorage(storageOptions(config));
  await Promise.all([storage.ensureBucket(), producer.ready()]);
  // Rate-limit counters: their own fail-fast connection, so an outage skips limits at once instead of queueing commands.
  const limitsRedis = createRedis(config.REDIS_URL, { failFast: true });
  limitsRedis.on('error', () => undefined);
  const repo = createImagesRepo(db);
  const eventStore = createJobEventStore(config.REDIS_URL, eventStoreOptions(config));
  const events = eventSink(eventStore, logger);
  const webhookClient = config.WEBHOOK_SECRET ? webhookClientFromConfig(config, 't2i') : undefined;
  // What the fleet serves (workers' announcements in Redis), read at most once a second, each read
  // bounded, on a fail-fast connection: while Redis is away a read fails at once and requests are
  // answered from the last one (src/core/models.ts), within the API's answer bound.
  const fleet = createFleetRegistry(config.REDIS_URL, config.QUEUE_NAME, { failFast: true });
  await fleet.ready();
  const bounded =
    <T>(read: () => Promise<T>) =>
    () =>
      withTimeout(read(), 2_000, 'reading the fleet');
  const models = new ModelCatalog({
    fleet: { members: bounded(() => fleet.members()), profiles: bounded(() => fleet.profiles()) },
    known: config.KNOWN_MODELS ?? [],
    defaultModel: config.DEFAULT_MODEL,
  });
  if (config.KNOWN_MODELS || config.DEFAULT_MODEL) logger.info({ known: models.known, defaultModel: config.DEFAULT_MODEL ?? null }, 'models configured');
  const images = new ImagesService({
    repo,
    queue: producer,
    storage,
    models,
    maxQueueDepth: config.MAX_QUEUE_DEPTH,
    maxPixelSteps: config.MAX_PIXEL_STEPS,
    quotas: { maxInFlight: config.TENANT_MAX_IN_FLIGHT, dailyPixelSteps: config.TENANT_DAILY_PIXEL_STEPS },
    log: logger,
    events,
    // The same check a send makes, so a refused URL is a 400 now rather than a failed delivery later.
    ...(webhookClient ? { checkWebhookUrl: (url: string) => webhookClient.check(url) } : {}),
  });
  // Follows a job of a tenant: another tenant's job is a 404, as everywhere.
  const follow = (tenantId: string, id: string, lastEventId: string | null) =>
    followJob(
      {
        log: eventStore.log,
        getJob: (jobId) => images.get(tenantId, jobId),
        result: (record) => images.result(record),
        position: (record) => (record.model === null ? Promise.resolve(null) : producer.position(record.model, record.id)),
        logger,
      },
      id,
      lastEventId,
    );
  // The page is read once, now: a missing build is said at start (and at /), not found by users later.
  const webDir = config.WEB_DIR ?? findWebDir();
  let webAssets: WebAssets | undefined;
  if (webDir) webAssets = loadWebAssets(webDir);
  else logger.warn({}, 'no built web page (dist/web): / answers 503; run `npm run build` or set WEB_DIR to a built page');
  const app = buildApp({
    images,
    accounts: new AccountsService(createAccountsRepo(db), logger),
    auth: config.AUTH,
    rateLimits: {
      redis: limitsRedis,
      // Per deployment (the queue name is), so deployments sharing a Redis do not share counters.
      namespace: `t2i:${config.QUEUE_NAME}:rate:`,
      perKey: { max: config.RATE_LIMIT_MAX, windowMs: config.RATE_LIMIT_WINDOW_MS },
      authFailures: { max: config.AUTH_FAILURE_LIMIT, windowMs: config.AUTH_FAILURE_WINDOW_MS },
    },
    corsOrigins: config.CORS_ORIGINS,
    trustProxy: config.TRUST_PROXY,
    logger,
    bodyLimit: config.BODY_LIMIT_BYTES,
    maxUploadBytes: config.MAX_UPLOAD_BYTES,
    metrics: createApiMetrics(),
    metricsToken: config.METRICS_TOKEN,
    reporter,
    checks: { postgres: () => repo.ping(), redis: () => producer.ping(), storage: () => storage.ping() },
    webhooks: { deliveries: createWebhookRepo(db) },
    events: { heartbeatMs: config.EVENTS_HEARTBEAT_MS, follow },
    openai: {
      follow: (tenantId, id) => follow(tenantId, id, null),
      readImage: (key) => storage.read(key),
      models: async () => (await models.snapshot()).served,
      waitMs: config.OPENAI_WAIT_MS,
    },
    discovery: { fleet: () => models.snapshot(), known: models.known, defaultOf: (s) => models.defaultOf(s), maxPixelSteps: config.MAX_PIXEL_STEPS },
    imageFiles: { read: (key) => storage.read(key), thumbnail: webpThumbnail },
    web: { assets: webAssets },
  });
  app.addHook('onClose', async () => {
    // A reporter the caller gave stays the caller's to close.
    // Bounded, so a Redis or Postgres that went away cannot hold the process open.
    await Promise.allSettled([
      withTimeout(producer.close(), 5_000, 'closing the queue connection'),
      Promise.resolve(limitsRedis.disconnect()),
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
