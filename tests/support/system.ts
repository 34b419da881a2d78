import { randomUUID } from 'node:crypto';
import { inject } from 'vitest';
import { loadConfig, type Config } from '../../src/config.js';
import { applyMigrations } from '../../src/adapters/db/migrate.js';
import { createDatabase } from '../../src/dev/services.js';

/**
 * A Config for one test file against the shared services, isolated by its own database, queue
 * name and bucket, so files can run in parallel without seeing each other's jobs.
 */
export async function isolatedConfig(overrides: Record<string, string> = {}): Promise<Config> {
  const s = inject('services');
  const suffix = randomUUID().slice(0, 8);
  const databaseUrl = await createDatabase(s.postgresUrl, `t2i_test_${suffix}`);
  await applyMigrations(databaseUrl);
  return loadConfig(
    {
      DATABASE_URL: databaseUrl,
      REDIS_URL: s.redisUrl,
      QUEUE_NAME: `test-${suffix}`,
      STORAGE_ENDPOINT: s.s3.endpoint,
      STORAGE_ACCESS_KEY: s.s3.accessKey,
      STORAGE_SECRET_KEY: s.s3.secretKey,
      STORAGE_REGION: s.s3.region,
      STORAGE_BUCKET: `t2i-test-${suffix}`,
      MODEL_DIR: s.oracleModelDir,
      EXECUTION_PROVIDER: 'cpu',
      HOST: '127.0.0.1',
      PORT: '0',
      WORKER_METRICS_PORT: '0',
      LOG_LEVEL: 'silent',
      LOG_PRETTY: 'false',
      PROGRESS_INTERVAL_MS: '0',
      JOB_BACKOFF_MS: '200',
      ...overrides,
    },
    'worker',
  );
}
