import { expect } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createStorage, objectKeyFor, type ImageStorage } from '../../src/adapters/storage.js';
import type { Config } from '../../src/config.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { storageOptions } from '../../src/core/wiring.js';
import { freePort, type LocalServices } from '../../src/dev/services.js';
import { createTestKey } from './accounts.js';
import { configEnv, spawnService, startOwnSystem, testEngineArgs, type ServiceProcess } from './processes.js';

/**
 * What the reliability test files share: their own Postgres, Redis and S3 (so they may restart
 * or cut them), API and worker processes (`t2i api`, `t2i worker --test-engine`), and the checks
 * that count what happened from rows and objects: successful result writes are job_attempts rows
 * closed as `succeeded` (written in the same statement as the fenced success), results are
 * objects in storage.
 */

export const STEP_MS = 40;

/** Fast failure detection, the same on every worker (BullMQ's stalled check is queue-wide). */
export const FAST = {
  JOB_LOCK_MS: '2000',
  JOB_STALLED_INTERVAL_MS: '1000',
  JOB_MAX_STALLS: '10',
  JOB_ATTEMPTS: '6',
  JOB_BACKOFF_MS: '300',
  RECONCILE_INTERVAL_MS: '1000',
  RECONCILE_QUEUED_AFTER_MS: '3000',
  PROGRESS_INTERVAL_MS: '100',
  SHUTDOWN_GRACE_MS: '10000',
  MAX_QUEUE_DEPTH: '0',
  // These tests are about failures, not limits (tests/integration/rate-limits.test.ts and
  // quotas.test.ts have those): nothing may be refused for being too many.
  RATE_LIMIT_MAX: '0',
  TENANT_MAX_IN_FLIGHT: '0',
  TENANT_DAILY_PIXEL_STEPS: '0',
  // Jobs are submitted while workers are down or not yet started: the test engine's model is known, so they wait.
  KNOWN_MODELS: 'test-engine',
  LOG_LEVEL: 'info',
} as const;

export interface System {
  services: LocalServices;
  base: Config;
  db: Db;
  repo: ImagesRepo;
  storage: ImageStorage;
  procs: ServiceProcess[];
  /** The Authorization header of a tenant's API key, for every request a test sends. */
  auth: { authorization: string };
  startApiProcess(overrides?: Record<string, string>): Promise<{ proc: ServiceProcess; url: string }>;
  startWorkerProcess(id: string, overrides?: Record<string, string>, stepMs?: number): Promise<ServiceProcess>;
  /** Stops every process a test started (a failed test must not leave workers consuming the next test's jobs). */
  stopProcesses(): Promise<void>;
  stop(): Promise<void>;
}

export async function startSystem(bucket: string, env: Record<string, string> = {}): Promise<System> {
  const { services, config: base } = await startOwnSystem(bucket, { ...FAST, ...env });
  const db = createPrismaClient(base.DATABASE_URL, { connectionTimeoutMillis: 1_000 });
  const repo = createImagesRepo(db);
  const storage = createStorage(storageOptions(base));
  await storage.ensureBucket();
  const { auth } = await createTestKey(base.DATABASE_URL);
  const procs: ServiceProcess[] = [];
  return {
    services,
    base,
    db,
    repo,
    storage,
    procs,
    auth,
    async startApiProcess(overrides = {}) {
      const port = await freePort();
      const proc = spawnService('api', 'api', configEnv(base, { PORT: String(port), ...overrides }));
      procs.push(proc);
      await proc.waitForLine((l) => l.msg === 'api listening');
      return { proc, url: `http://127.0.0.1:${port}` };
    },
    async startWorkerProcess(id, overrides = {}, stepMs = STEP_MS) {
      const proc = spawnService(id, 'worker', configEnv(base, { WORKER_ID: id, ...overrides }), testEngineArgs(stepMs));
      procs.push(proc);
      await proc.waitForLine((l) => l.msg === 'worker ready');
      return proc;
    },
    async stopProcesses() {
      await Promise.allSettled(procs.splice(0).map((p) => p.stop()));
    },
    async stop() {
      await Promise.allSettled(procs.splice(0).map((p) => p.stop()));
      await db.$disconnect();
      await services.stop();
    },
  };
}

export async function submit(url: string, body: object, auth: { authorization: string }): Promise<string> {
  const r = await fetch(`${url}/generated-images`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
  expect(r.status).toBe(201);
  return ((await r.json()) as { id: string }).id;
}

export async function waitTerminal(db: Db, ids: string[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const rows = await db.generatedImage.findMany({ where: { id: { in: ids } }, select: { status: true } }).catch(() => []);
    if (rows.length === ids.length && rows.every((r) => ['succeeded', 'failed', 'canceled'].includes(r.status))) return;
    if (Date.now() > deadline) throw new Error(`jobs not finished after ${timeoutMs} ms: ${JSON.stringify(rows.map((r) => r.status))}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Per job: successful result writes (attempts closed as succeeded) and objects in storage. */
export async function resultsPerJob(sys: Pick<System, 'db' | 'storage'>, ids: string[]): Promise<Map<string, { writes: number; objects: string[] }>> {
  const writes = await sys.db.jobAttempt.groupBy({ by: ['imageId'], where: { imageId: { in: ids }, outcome: 'succeeded' }, _count: true });
  const byId = new Map(writes.map((w) => [w.imageId, w._count]));
  const out = new Map<string, { writes: number; objects: string[] }>();
  for (const id of ids) out.set(id, { writes: byId.get(id) ?? 0, objects: await sys.storage.list(`images/${id}/`) });
  return out;
}

/**
 * Every job succeeded with exactly one successful result write and exactly one object, the one
 * its row names. Returns the counts, computed from rows and objects, for the report.
 */
export async function expectEachSucceededOnce(
  sys: Pick<System, 'db' | 'storage'>,
  ids: string[],
): Promise<{ jobs: number; lost: number; runTwice: number; extraObjects: number; maxResultsPerJob: number }> {
  const rows = await sys.db.generatedImage.findMany({ where: { id: { in: ids } } });
  const results = await resultsPerJob(sys, ids);
  const lost = ids.length - rows.filter((r) => r.status === 'succeeded').length;
  const runTwice = [...results.values()].filter((r) => r.writes > 1).length;
  const extraObjects = [...results.values()].reduce((n, r) => n + Math.max(0, r.objects.length - 1), 0);
  expect(rows.map((r) => r.status)).toEqual(ids.map(() => 'succeeded'));
  for (const r of rows) {
    const res = results.get(r.id)!;
    expect(res.writes, `successful result writes of ${r.id}`).toBe(1);
    expect(res.objects, `objects of ${r.id}`).toEqual([r.fileName]);
    expect(r.fileName).toBe(objectKeyFor(r.id, r.attempts));
  }
  expect({ lost, runTwice, extraObjects }).toEqual({ lost: 0, runTwice: 0, extraObjects: 0 });
  const maxResultsPerJob = Math.max(...[...results.values()].map((r) => Math.max(r.writes, r.objects.length)));
  return { jobs: ids.length, lost, runTwice, extraObjects, maxResultsPerJob };
}

/** Polls until `probe` gives a value (errors count as not yet: a database may be restarting). */
export async function pollFor<T>(probe: () => Promise<T | undefined>, timeoutMs: number, intervalMs = 25): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

export const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

/** A Prometheus text exposition's value for one series, written as exposed, e.g. `t2i_engine_restarts_total{reason="crashed",model="test-engine"}` (a worker's series end with its model). */
export async function metricValue(metricsUrl: string, series: string): Promise<number | undefined> {
  const text = await (await fetch(`${metricsUrl}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}
