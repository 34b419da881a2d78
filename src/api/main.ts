import { createImagesRepo } from '../adapters/images-repo.js';
import { createProducer } from '../adapters/queue.js';
import { createStorage } from '../adapters/storage.js';
import { loadConfig, type Config } from '../config.js';
import { createPrismaClient } from '../core/db/client.js';
import { ImagesService } from '../core/images.js';
import { createLogger } from '../core/logger.js';
import { queueSettings, storageOptions } from '../core/wiring.js';
import { buildApp } from './app.js';

/** Boots the API process: configuration, clients, the app, listen, and an orderly close. */

export interface RunningApi {
  url: string;
  close(): Promise<void>;
}

export async function startApi(config: Config = loadConfig(process.env, 'api')): Promise<RunningApi> {
  const logger = createLogger({ level: config.LOG_LEVEL, pretty: config.LOG_PRETTY, name: 'api' });
  const db = createPrismaClient(config.DATABASE_URL, { poolMax: config.DATABASE_POOL_MAX, log: (level, msg) => logger[level]({}, msg) });
  const producer = createProducer(config.REDIS_URL, queueSettings(config));
  const storage = createStorage(storageOptions(config));
  await storage.ensureBucket();
  const repo = createImagesRepo(db);
  const images = new ImagesService({ repo, queue: producer, storage, log: logger });
  const app = buildApp({
    images,
    logger,
    bodyLimit: config.BODY_LIMIT_BYTES,
    checks: { postgres: () => repo.ping(), redis: async () => void (await producer.counts()), storage: () => storage.ping() },
  });
  app.addHook('onClose', async () => {
    await Promise.allSettled([producer.close(), db.$disconnect()]);
  });
  const url = await app.listen({ host: config.HOST, port: config.PORT });
  logger.info({ url }, 'api listening');
  return { url, close: () => app.close() };
}
