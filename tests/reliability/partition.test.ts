import { spawn } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createStorage, type ImageStorage } from '../../src/adapters/storage.js';
import { applyMigrations } from '../../src/adapters/db/migrate.js';
import { loadConfig, type Config } from '../../src/config.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { storageOptions } from '../../src/core/wiring.js';
import { servicesEnv, startServices, type LocalServices } from '../../src/dev/services.js';
import { createTestKey } from '../support/accounts.js';
import { createNetwork, type Network } from '../support/netns.js';
import { configEnv, saveReport, ServiceProcess, testEngineArgs } from '../support/processes.js';
import { expectEachSucceededOnce, FAST, pollFor, submit, waitTerminal } from '../support/reliability.js';

/**
 * A network partition between hosts, on one machine: Postgres, Redis and S3 in one network
 * namespace, the API in another, two workers in two more, all made by this test (tests/support/
 * netns.ts). One worker's link is cut in the middle of a job; the other takes the job over; the
 * link heals. The job ends with exactly one result, the healed worker's late writes to the row
 * and to storage are refused or removed, and it rejoins and takes new jobs.
 *
 * Needs root (network namespaces), which CI has; without it the test fails saying so.
 */

const BIN = path.resolve('bin/t2i.js');
/** The cut worker's steps are slow, so it is still generating when its link heals; the other's are fast. */
const SLOW_STEP_MS = 250;
const FAST_STEP_MS = 40;
const STEPS = 60;

let net: Network;
let services: LocalServices;
let base: Config;
let db: Db;
let repo: ImagesRepo;
let storage: ImageStorage;
const procs: ServiceProcess[] = [];
/** A tenant's API key, for every request the test sends. */
let auth: { authorization: string };
const report: Record<string, unknown> = {};

beforeAll(async () => {
  net = await createNetwork(['svc', 'api', 'w1', 'w2']);
  const svc = net.hosts.svc!;
  services = await startServices({ host: svc.address, wrap: svc.exec });
  await applyMigrations(services.postgres.url);
  ({ auth } = await createTestKey(services.postgres.url));
  base = loadConfig({ ...servicesEnv(services, 't2i-partition'), ...FAST, WORKER_METRICS_PORT: '9191', PORT: '8000' }, 'any');
  db = createPrismaClient(base.DATABASE_URL, { connectionTimeoutMillis: 1_000 });
  repo = createImagesRepo(db);
  storage = createStorage(storageOptions(base));
  await storage.ensureBucket();
}, 180_000);

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.$disconnect();
  await services?.stop();
  await net?.destroy();
  saveReport(report);
}, 60_000);

/** `t2i <role>` inside a host's namespace, listening on its address. */
function spawnIn(host: string, name: string, role: 'api' | 'worker', env: Record<string, string>, args: string[] = []): ServiceProcess {
  const h = net.hosts[host]!;
  const { cmd, args: full } = h.exec(process.execPath, [BIN, role, ...args]);
  const proc = new ServiceProcess(
    name,
    spawn(cmd, full, { env: configEnv(base, { HOST: h.address, WORKER_METRICS_HOST: h.address, ...env }), stdio: ['ignore', 'pipe', 'pipe'] }),
  );
  procs.push(proc);
  return proc;
}

/** Takeover: the lock must expire and a stalled check run, then the other worker starts it. */
const TAKEOVER_BOUND_MS = Number(FAST.JOB_LOCK_MS) + Number(FAST.JOB_STALLED_INTERVAL_MS) + 3_000;
/**
 * Rejoin: after the heal the worker's connections resume once TCP retransmits (its backoff grows
 * while the link is down: the next try can come seconds after the heal), then it fetches again.
 */
const REJOIN_BOUND_MS = 45_000;

describe('a network partition between hosts', () => {
  it('a worker cut off mid-job loses it to another; after the heal its late writes are refused or removed, and it rejoins', async () => {
    const api = spawnIn('api', 'api', 'api', {});
    await api.waitForLine((l) => l.msg === 'api listening');
    const url = `http://${net.hosts.api!.address}:8000`;
    const w1 = spawnIn('w1', 'w1', 'worker', { WORKER_ID: 'w1' }, testEngineArgs(SLOW_STEP_MS));
    await w1.waitForLine((l) => l.msg === 'worker ready', 60_000);

    // The job starts on w1 alone, so we know where it runs.
    const id = await submit(url, { prompt: 'partition', num_steps: STEPS, seed: 11 }, auth);
    await pollFor(async () => ((await repo.get(id))?.progress ?? 0) >= 5 || undefined, 30_000);
    const w2 = spawnIn('w2', 'w2', 'worker', { WORKER_ID: 'w2' }, testEngineArgs(FAST_STEP_MS));
    await w2.waitForLine((l) => l.msg === 'worker ready', 60_000);

    await net.cut('w1');
    const cutAt = Date.now();
    // Work keeps arriving during the partition; only w2 can take it.
    const during: string[] = [];
    for (let i = 0; i < 4; i++) during.push(await submit(url, { prompt: `during the partition ${i}`, num_steps: 5 }, auth));
    const takenOver = await pollFor(async () => {
      const row = await repo.get(id);
      return row && row.attempts >= 2 && row.workerId === 'w2' ? Date.now() : undefined;
    }, 60_000);
    const takeoverMs = takenOver - cutAt;
    await waitTerminal(db, [id], 60_000);
    expect(await repo.get(id)).toMatchObject({ status: 'succeeded', workerId: 'w2' });

    // Heal while w1 is still generating its stale attempt (60 steps of 250 ms).
    await net.heal('w1');
    const healedAt = Date.now();
    // w1 learns it lost the job at its next progress write, or its result is refused after upload.
    const stale = await w1.waitForLine((l) => l.jobId === id && (l.outcome === 'superseded' || l.outcome === 'retrying' || l.outcome === 'failed'), 90_000);

    // Rejoin: new jobs, until w1 runs one.
    const later: string[] = [];
    let rejoinedAt: number | undefined;
    const rejoinDeadline = Date.now() + REJOIN_BOUND_MS + 15_000;
    while (rejoinedAt === undefined && Date.now() < rejoinDeadline) {
      later.push(await submit(url, { prompt: `after the heal ${later.length}`, num_steps: 2 }, auth));
      await new Promise((r) => setTimeout(r, 500));
      const started = w1.lines.find((l) => l.msg === 'generation started' && later.includes(String(l.jobId)));
      if (started) rejoinedAt = Date.now();
    }
    expect(rejoinedAt, 'w1 ran a new job after the heal').toBeDefined();
    const rejoinMs = rejoinedAt! - healedAt;
    await waitTerminal(db, [...during, ...later], 60_000);

    // One result per job, from rows and objects; w1's attempt at the partitioned job did not count.
    const counts = await expectEachSucceededOnce({ db, storage }, [id, ...during, ...later]);
    const attempts = await repo.attempts(id);
    expect(attempts.filter((a) => a.workerId === 'w1').every((a) => a.outcome !== 'succeeded')).toBe(true);
    expect(attempts.filter((a) => a.outcome === 'succeeded').map((a) => a.workerId)).toEqual(['w2']);
    expect(takeoverMs).toBeLessThanOrEqual(TAKEOVER_BOUND_MS);
    expect(rejoinMs).toBeLessThanOrEqual(REJOIN_BOUND_MS);
    report.partition = {
      jobsSubmitted: counts.jobs,
      lost: counts.lost,
      resultsPerJob: counts.maxResultsPerJob,
      staleWorkerOutcome: stale.outcome,
      attemptsOfCutJob: attempts.map((a) => `${a.workerId}:${a.outcome}`),
      takeoverMs,
      takeoverBoundMs: TAKEOVER_BOUND_MS,
      rejoinMs,
      rejoinBoundMs: REJOIN_BOUND_MS,
    };
  });
});
