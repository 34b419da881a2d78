import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createStorage, objectKeyFor, type ImageStorage } from '../../src/adapters/storage.js';
import type { Config } from '../../src/config.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { storageOptions } from '../../src/core/wiring.js';
import { freePort, type LocalServices } from '../../src/dev/services.js';
import { configEnv, CuttableProxy, saveReport, spawnService, startOwnSystem, type ServiceProcess } from '../support/processes.js';

/**
 * Failure tests with real processes: API and workers started as `t2i api` / `t2i worker` on the
 * synthetic engine (each step waits SYNTHETIC_STEP_MS, using no CPU), against their own Postgres,
 * Redis and S3 so that Redis and Postgres can be restarted without disturbing other test files.
 * Figures go to reliability-report.json (REPORT_DIR, default .t2i/) for the README.
 */

const STEP_MS = 40;
let services: LocalServices;
let base: Config;
let db: Db;
let repo: ImagesRepo;
let storage: ImageStorage;
const procs: ServiceProcess[] = [];
const report: Record<string, unknown> = {};

beforeAll(async () => {
  ({ services, config: base } = await startOwnSystem('t2i-reliability', {
    SYNTHETIC_STEP_MS: String(STEP_MS),
    // Fast failure detection, the same on every worker (BullMQ's stalled check is queue-wide).
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
    LOG_LEVEL: 'info',
  }));
  db = createPrismaClient(base.DATABASE_URL, { connectionTimeoutMillis: 1_000 });
  repo = createImagesRepo(db);
  storage = createStorage(storageOptions(base));
  await storage.ensureBucket();
}, 120_000);

// A failed test must not leave its workers consuming the next test's jobs.
afterEach(async () => {
  await Promise.allSettled(procs.splice(0).map((p) => p.stop()));
});

afterAll(async () => {
  await db?.$disconnect();
  await services?.stop();
  saveReport(report);
}, 60_000);

async function startApiProcess(overrides: Record<string, string> = {}): Promise<{ proc: ServiceProcess; url: string }> {
  const port = await freePort();
  const proc = spawnService('api', 'api', configEnv(base, { PORT: String(port), ...overrides }));
  procs.push(proc);
  await proc.waitForLine((l) => l.msg === 'api listening');
  return { proc, url: `http://127.0.0.1:${port}` };
}

async function startWorkerProcess(id: string, overrides: Record<string, string> = {}): Promise<ServiceProcess> {
  const proc = spawnService(id, 'worker', configEnv(base, { WORKER_ID: id, ...overrides }));
  procs.push(proc);
  await proc.waitForLine((l) => l.msg === 'worker ready');
  return proc;
}

async function submit(url: string, body: object): Promise<string> {
  const r = await fetch(`${url}/generated-images`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
  expect(r.status).toBe(201);
  return ((await r.json()) as { id: string }).id;
}

async function waitTerminal(ids: string[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const rows = await db.generatedImage.findMany({ where: { id: { in: ids } }, select: { status: true } });
    if (rows.length === ids.length && rows.every((r) => ['succeeded', 'failed', 'canceled'].includes(r.status))) return;
    if (Date.now() > deadline) throw new Error(`jobs not finished after ${timeoutMs} ms: ${JSON.stringify(rows.map((r) => r.status))}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Every job succeeded, with its object in storage, and no job has two successful results. */
async function expectEachSucceededOnce(ids: string[], workers: ServiceProcess[]): Promise<void> {
  const rows = await db.generatedImage.findMany({ where: { id: { in: ids } } });
  expect(rows.map((r) => r.status)).toEqual(ids.map(() => 'succeeded'));
  for (const r of rows) expect(await storage.stat(objectKeyFor(r.id)), `object of ${r.id}`).not.toBeNull();
  const successes = new Map<string, number>();
  for (const w of workers) for (const l of w.lines) if (l.msg === 'job succeeded') successes.set(String(l.jobId), (successes.get(String(l.jobId)) ?? 0) + 1);
  for (const id of ids) expect(successes.get(id) ?? 0, `successful attempts of ${id}`).toBe(1);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

describe('failures, with real processes', () => {
  it('1. SIGKILLed workers: every job still succeeds exactly once', async () => {
    const { url } = await startApiProcess();
    const all: ServiceProcess[] = [];
    let generation = 0;
    const live = new Map<string, ServiceProcess>();
    for (const slot of ['a', 'b']) {
      const w = await startWorkerProcess(`kill-${slot}-${generation}`);
      live.set(slot, w);
      all.push(w);
    }
    const ids: string[] = [];
    for (let i = 0; i < 24; i++) ids.push(await submit(url, { prompt: `kill test ${i}`, num_steps: 20 }));

    const recoveries: number[] = [];
    for (let kill = 0; recoveries.length < 4 && kill < 8; kill++) {
      // Find a worker in the middle of a job, and kill it.
      const victim = await pollFor(async () => {
        const row = await db.generatedImage.findFirst({ where: { id: { in: ids }, status: 'running', progress: { gt: 10 } } });
        const slot = row && [...live].find(([, w]) => w.name === row.workerId)?.[0];
        if (row && slot) return { row, slot };
        const open = await db.generatedImage.count({ where: { id: { in: ids }, status: { in: ['queued', 'running'] } } });
        return open === 0 ? null : undefined;
      }, 20_000);
      if (!victim) break;
      const killedAt = Date.now();
      live.get(victim.slot)!.kill('SIGKILL');
      generation++;
      const replacement = await startWorkerProcess(`kill-${victim.slot}-${generation}`);
      live.set(victim.slot, replacement);
      all.push(replacement);
      // Recovered when another attempt is running (or has finished) the job. If the victim
      // finished it in the moment before the kill landed, there is nothing to recover.
      const outcome = await pollFor(async () => {
        const r = await db.generatedImage.findUnique({ where: { id: victim.row.id } });
        if (!r) return undefined;
        if (r.attempts > victim.row.attempts) return 'recovered';
        if (r.status === 'succeeded') return 'finished before the kill';
        return undefined;
      }, 30_000);
      if (outcome !== 'recovered') continue;
      recoveries.push(Date.now() - killedAt);
    }
    await waitTerminal(ids, 60_000);
    await expectEachSucceededOnce(ids, all);
    expect(recoveries.length).toBeGreaterThanOrEqual(3);
    report.sigkill = {
      jobs: ids.length,
      kills: recoveries.length,
      lost: 0,
      runTwice: 0,
      recoveryMs: { median: median(recoveries), max: Math.max(...recoveries), all: recoveries },
    };
    await Promise.all([...live.values()].map((w) => w.stop()));
  });

  it('2. a SIGSTOPped worker that wakes after its job moved on cannot overwrite the result', async () => {
    const { url } = await startApiProcess();
    const stale = await startWorkerProcess('stop-a');
    const id = await submit(url, { prompt: 'stop test', num_steps: 50 });
    await pollFor(async () => ((await repo.get(id))?.progress ?? 0) > 5 || undefined, 20_000);
    stale.kill('SIGSTOP');
    const stoppedAt = Date.now();
    const fresh = await startWorkerProcess('stop-b');
    await pollFor(async () => ((await repo.get(id))?.status === 'succeeded' ? true : undefined), 30_000);
    const takeoverMs = Date.now() - stoppedAt;
    stale.kill('SIGCONT');
    // The stale attempt learns at its next progress write that it no longer owns the job.
    await stale.waitForLine((l) => l.jobId === id && l.outcome === 'superseded', 20_000);
    const row = (await repo.get(id))!;
    expect(row).toMatchObject({ status: 'succeeded', workerId: 'stop-b', attempts: 2, progress: 100 });
    await expectEachSucceededOnce([id], [stale, fresh]);
    report.sigstop = { results: 1, staleUpdatesRefused: 1, stopToResultMs: takeoverMs };
    await Promise.all([stale.stop(), fresh.stop()]);
  });

  it('3. Redis and Postgres restarts under steady submissions: fast 503s, recovery without restarts, nothing lost', async () => {
    const { proc: api, url } = await startApiProcess();
    const w = await startWorkerProcess('restart-a');
    const accepted: string[] = [];
    const statuses = new Map<number, number>();
    const slow: number[] = [];
    let running = true;
    /** Called after every answer (or timeout), so phases can wait for answers instead of sleeping. */
    const onAnswer = new Set<() => void>();
    /** Resolves once `n` more POSTs were accepted (201), failing after `timeoutMs`. */
    const moreAccepted = (n: number, what: string, timeoutMs = 30_000) =>
      new Promise<void>((resolve, reject) => {
        const target = accepted.length + n;
        const check = () => {
          if (accepted.length < target) return;
          clearTimeout(timer);
          onAnswer.delete(check);
          resolve();
        };
        const timer = setTimeout(() => {
          onAnswer.delete(check);
          reject(new Error(`${what}: fewer than ${n} POSTs accepted in ${timeoutMs} ms (statuses so far ${JSON.stringify(Object.fromEntries(statuses))})`));
        }, timeoutMs);
        onAnswer.add(check);
      });
    const load = (async () => {
      while (running) {
        const t0 = Date.now();
        try {
          const r = await fetch(`${url}/generated-images`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ prompt: 'restart test', num_steps: 5 }),
            signal: AbortSignal.timeout(5_000),
          });
          statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
          if (r.status === 201) accepted.push(((await r.json()) as { id: string }).id);
          else expect(r.headers.get('content-type')).toContain('application/problem+json');
        } catch {
          statuses.set(0, (statuses.get(0) ?? 0) + 1); // no answer within 5 s: a hang
        }
        const dt = Date.now() - t0;
        if (dt > 1_000) slow.push(dt);
        for (const f of [...onAnswer]) f();
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    // Each outage: the system is accepting jobs, the service is down for OUTAGE_MS under the
    // steady submissions (the scenario itself, hence a fixed duration), and once it is back the
    // API must accept jobs again, without any process being restarted.
    const OUTAGE_MS = 3_000;
    const outage = async (name: 'redis' | 'postgres') => {
      await moreAccepted(5, `before the ${name} outage`);
      await services.stopService(name);
      await new Promise((r) => setTimeout(r, OUTAGE_MS));
      await services.startService(name);
      await moreAccepted(5, `after ${name} came back`);
    };
    await outage('redis');
    await outage('postgres');
    running = false;
    await load;
    for (const l of api.lines) if (l.msg === 'request failed') console.log('500 from the api:', JSON.stringify(l).slice(0, 3000));
    expect(statuses.get(0) ?? 0, 'requests with no answer in 5 s').toBe(0);
    expect(statuses.get(500) ?? 0, '500 responses').toBe(0);
    expect(statuses.get(503) ?? 0, '503 responses while a service was down').toBeGreaterThan(0);
    expect(api.running && w.running).toBe(true);
    // Accepted before, during and after: all done, including jobs Redis forgot when it restarted empty.
    await waitTerminal(accepted, 90_000);
    await expectEachSucceededOnce(accepted, [w]);
    report.restarts = {
      submitted: [...statuses.values()].reduce((a, b) => a + b, 0),
      accepted: accepted.length,
      statuses: Object.fromEntries(statuses),
      lost: 0,
      slowestAnswerMs: Math.max(0, ...slow),
    };
    await Promise.all([api.stop(), w.stop()]);
  });

  it('4. enqueueing fails after the row is committed (Redis down during POST): the reconciler gets the job done', async () => {
    const { proc: api, url } = await startApiProcess();
    const w = await startWorkerProcess('reconcile-a');
    await services.stopService('redis');
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(await submit(url, { prompt: `redis down ${i}`, num_steps: 3 }));
    for (const id of ids) expect((await repo.get(id))?.status).toBe('queued');
    const back = Date.now();
    await services.startService('redis');
    await waitTerminal(ids, 30_000);
    await expectEachSucceededOnce(ids, [w]);
    report.enqueueFailure = { jobs: ids.length, lost: 0, redisBackToAllDoneMs: Date.now() - back };
    await Promise.all([api.stop(), w.stop()]);
  });

  it('5. storage unavailable during uploads: retries, then success or a clear failure; never succeeded without the object', async () => {
    const proxy = new CuttableProxy(services.s3.port);
    await proxy.start();
    const { proc: api, url } = await startApiProcess();
    const w = await startWorkerProcess('storage-a', { STORAGE_ENDPOINT: `http://127.0.0.1:${proxy.port}`, JOB_ATTEMPTS: '3', JOB_BACKOFF_MS: '500' });
    // A short outage: attempts fail, a retry succeeds.
    proxy.sever();
    const recovering = await submit(url, { prompt: 'storage blip', num_steps: 2 });
    await w.waitForLine((l) => l.jobId === recovering && /storing the image failed/.test(l.msg), 20_000);
    proxy.restore();
    await waitTerminal([recovering], 30_000);
    await expectEachSucceededOnce([recovering], [w]);
    // A long outage: every attempt fails and the job says why.
    proxy.sever();
    const doomed = await submit(url, { prompt: 'storage gone', num_steps: 2 });
    await waitTerminal([doomed], 30_000);
    const row = (await repo.get(doomed))!;
    expect(row.status).toBe('failed');
    expect(row.error).toMatch(/^storing the image failed: /);
    expect(row.fileName).toBeNull();
    proxy.restore();
    const succeeded = await db.generatedImage.findMany({ where: { status: 'succeeded' } });
    for (const r of succeeded) expect(await storage.stat(objectKeyFor(r.id)), `object of ${r.id}`).not.toBeNull();
    report.storageOutage = { shortOutage: 'succeeded after a retry', longOutage: row.error, succeededWithoutObject: 0 };
    await Promise.all([api.stop(), w.stop()]);
    await proxy.close();
  });

  it('6. SIGTERM during a job: finished within a long grace period, handed back after a short one; a second signal exits at once', async () => {
    const { proc: api, url } = await startApiProcess();
    // Grace longer than the job: the job finishes, then the worker exits cleanly.
    const patient = await startWorkerProcess('term-long', { SHUTDOWN_GRACE_MS: '20000' });
    const a = await submit(url, { prompt: 'finish me', num_steps: 30 });
    await pollFor(async () => ((await repo.get(a))?.progress ?? 0) > 10 || undefined, 20_000);
    const t0 = Date.now();
    patient.kill('SIGTERM');
    const exit1 = await patient.exited;
    const longGraceExitMs = Date.now() - t0;
    expect(exit1.code).toBe(0);
    expect((await repo.get(a))?.status).toBe('succeeded');

    // Grace shorter than the job: handed back, run again by the next worker.
    const hasty = await startWorkerProcess('term-short', { SHUTDOWN_GRACE_MS: '300' });
    const b = await submit(url, { prompt: 'hand me back', num_steps: 50 });
    await pollFor(async () => ((await repo.get(b))?.progress ?? 0) > 5 || undefined, 20_000);
    const t1 = Date.now();
    hasty.kill('SIGTERM');
    const exit2 = await hasty.exited;
    const shortGraceExitMs = Date.now() - t1;
    expect(exit2.code).toBe(0);
    expect(hasty.lines.some((l) => l.jobId === b && l.outcome === 'released')).toBe(true);
    expect((await repo.get(b))?.status).toBe('queued');
    const next = await startWorkerProcess('term-next');
    await waitTerminal([b], 30_000);
    await expectEachSucceededOnce([b], [hasty, next]);

    // A second signal does not wait for anything.
    const c = await submit(url, { prompt: 'impatient', num_steps: 50 });
    await pollFor(async () => ((await repo.get(c))?.status === 'running' ? true : undefined), 20_000);
    const t2 = Date.now();
    next.kill('SIGTERM');
    // The second signal must find the first one handled: the worker says so when it starts closing.
    await next.waitForLine((l) => l.msg === 'shutting down', 5_000);
    next.kill('SIGTERM');
    const exit3 = await next.exited;
    expect(exit3.code).toBe(130);
    report.sigterm = {
      longGrace: { exitMs: longGraceExitMs, job: 'finished' },
      shortGrace: { graceMs: 300, exitMs: shortGraceExitMs, job: 'handed back, then succeeded on another worker' },
      secondSignalExitMs: Date.now() - t2,
    };
    await api.stop();
  });
});

async function pollFor<T>(probe: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch {
      // the database may be restarting
    }
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
