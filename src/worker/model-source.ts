import path from 'node:path';
import { createModelStore } from '../adapters/model-store.js';
import type { Config } from '../config.js';
import type { Logger } from '../core/logger.js';
import { syncModel, type Log, type SyncOptions, type SyncResult } from '../core/model-cache.js';

/**
 * Where the worker loads its model from: MODEL_DIR as it is, or, with MODEL_URI, the export in
 * S3 synced into MODEL_CACHE_DIR (verified, reused when complete). Called once at boot.
 */
export async function resolveModelDir(config: Config, logger: Logger, options: Partial<SyncOptions> = {}): Promise<string> {
  if (!config.MODEL_URI) return path.resolve(config.MODEL_DIR!);
  const r = await syncModelFromConfig(config, logger, options);
  return r.dir;
}

export async function syncModelFromConfig(config: Config, logger: Logger, options: Partial<SyncOptions> = {}): Promise<SyncResult> {
  const store = createModelStore(config.MODEL_URI!, {
    endpoint: config.STORAGE_ENDPOINT,
    accessKey: config.STORAGE_ACCESS_KEY,
    secretKey: config.STORAGE_SECRET_KEY,
    region: config.STORAGE_REGION,
  });
  const log: Log = (level, msg, fields = {}) => logger[level]({ component: 'model-cache', ...fields }, msg);
  const started = performance.now();
  const r = await syncModel(store, config.MODEL_CACHE_DIR, { log, ...options });
  logger.info(
    {
      component: 'model-cache',
      modelUri: store.uri,
      modelDir: r.dir,
      outcome: r.outcome,
      downloadedBytes: r.downloadedBytes,
      resumedBytes: r.resumedBytes,
      totalBytes: r.totalBytes,
      ms: Math.round(performance.now() - started),
    },
    r.outcome === 'complete' ? 'model found complete in the cache' : 'model synced from the object store',
  );
  return r;
}
