import type { Config } from '../config.js';
import type { QueueSettings } from './jobs.js';
import type { StorageOptions } from '../adapters/storage.js';
import type { JobEventStoreOptions } from '../adapters/job-events.js';

/** Settings objects for the adapters, derived from the one Config. */

export function queueSettings(c: Config): QueueSettings {
  return {
    queueName: c.QUEUE_NAME,
    attempts: c.JOB_ATTEMPTS,
    backoffMs: c.JOB_BACKOFF_MS,
    lockMs: c.JOB_LOCK_MS,
    stalledIntervalMs: c.JOB_STALLED_INTERVAL_MS,
    maxStalls: c.JOB_MAX_STALLS,
    keepCompleted: c.JOB_KEEP_COMPLETED,
    keepFailed: c.JOB_KEEP_FAILED,
  };
}

export function storageOptions(c: Config): StorageOptions {
  return {
    endpoint: c.STORAGE_ENDPOINT,
    ...(c.STORAGE_PUBLIC_ENDPOINT ? { publicEndpoint: c.STORAGE_PUBLIC_ENDPOINT } : {}),
    accessKey: c.STORAGE_ACCESS_KEY,
    secretKey: c.STORAGE_SECRET_KEY,
    bucket: c.STORAGE_BUCKET,
    region: c.STORAGE_REGION,
    presignTtlSeconds: c.PRESIGN_TTL_SECONDS,
  };
}

/** Events kept per job log: previews at 2 per second for 10 minutes, plus a step event each. */
const EVENTS_PER_JOB = 2_000;

export function eventStoreOptions(c: Config): JobEventStoreOptions {
  return { namespace: `t2i:events:${c.QUEUE_NAME}`, maxLen: EVENTS_PER_JOB, ttlMs: c.EVENTS_RETENTION_SECONDS * 1000 };
}
