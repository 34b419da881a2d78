import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import { Queue } from 'bullmq';
import Fastify from 'fastify';
import pg from 'pg';
import { pino } from 'pino';
import { createAccountsRepo } from '../adapters/accounts-repo.js';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createConsumer, createRedis, UnrecoverableError } from '../adapters/queue.js';
import { createStorage, objectKeyFor } from '../adapters/storage.js';
import { loadConfig } from '../config.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { applyMigrations } from '../adapters/db/migrate.js';
import { AccountsService } from '../core/accounts.js';
import { queueNameFor } from '../core/jobs.js';
import { queueSettings, storageOptions } from '../core/wiring.js';
import { freePort, servicesEnv, startServices, type LocalServices } from '../dev/services.js';
import type { GenerateParams, Generation } from '../engine/pipeline.js';
import { createProcessor } from '../worker/processor.js';
import { summarizeCpuProfile } from './cpu-profile.js';
import { fixedPng, rowTimes } from './job-times.js';

/**
 * `t2i bench service`: what the service adds around generation, on real Postgres, Redis and S3
 * (startServices), measured side by side in one run.
 *
 * 1. Accepted POSTs per second: autocannon against the real API (`node bin/t2i.js api`, a child
 *    process: Postgres insert + BullMQ enqueue per request, no worker, so jobs just queue) and
 *    against a bare Fastify app in another child process (same loader, parses the same JSON
 *    body, answers 201 with a constant). Rounds alternate so both see the same machine load;
 *    the queue is obliterated and the table truncated between rounds. Latency percentiles come
 *    from autocannon's per-response timings (hrtime, sub-millisecond).
 * 2. Per-job overhead of the queue path with a zero-cost engine (generate() returns a fixed
 *    PNG at once): a worker built from createConsumer + createProcessor with the real repo and
 *    real storage, in this process. Jobs are submitted through the real API; the overhead is
 *    measured server-side as finished_at - created_at - generation_ms from the row (both clocks
 *    on this machine), first one job at a time, then as a burst of all jobs at once.
 */

export interface ServiceBenchOptions {
  /** Measured autocannon rounds per server (alternating). Default 3. */
  rounds?: number;
  /** Seconds per measured round. Default 10. */
  durationSec?: number;
  /** Seconds of unmeasured warm-up per server before the rounds. Default 2. */
  warmupSec?: number;
  /** autocannon connections (many clients at once, as a public API sees). Default 50. */
  connections?: number;
  /** Jobs in the sequential run and in the burst. Default 200. */
  jobs?: number;
  /** LOG_LEVEL of the API child (its stdout goes to /dev/null). Default info, as deployed. */
  logLevel?: string;
}

/** Issue 14's goal for the API's intake on this machine (2 cores shared with Postgres, Redis and the load generator). */
const INTAKE_GOAL = { rps: 3_000, p99Ms: 50 } as const;
/** Per-job overhead of the queue path (enqueue -> stored, minus generation), against the local S3 server. */
const OVERHEAD_GOAL = { p50Ms: 15, p99Ms: 50 } as const;

const BODY = JSON.stringify({ prompt: 'a red circle', num_steps: 1, width: 64, height: 64, seed: 1, scheduler: 'euler' });
const BIN = fileURLToPath(new URL('../../bin/t2i.js', import.meta.url));
/** The zero-cost engine's model name: its jobs' queue. */
const BENCH_MODEL = 'zero-cost';

const CONSTANT_REPLY = { id: '00000000-0000-0000-0000-000000000000', status: 'queued' };

const out = (line: string) => process.stdout.write(`${line}\n`);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const sorted = Float64Array.from(xs).sort();
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const median = (xs: number[]) => quantile(xs, 0.5);
const ms = (v: number) => `${v.toFixed(2)} ms`;
const pad = (s: string, n: number) => s.padEnd(n);

/** `t2i bench --bare-server PORT`: the bare Fastify app, run as a child like the API. */
export async function runBareServer(port: number): Promise<void> {
  const app = Fastify();
  app.post('/generated-images', async (request, reply) => {
    const body = request.body;
    if (typeof body !== 'object' || body === null) return reply.status(400).send({ error: 'not an object' });
    return reply.status(201).send(CONSTANT_REPLY);
  });
  app.get('/healthz', async () => ({ status: 'ok' }));
  await app.listen({ host: '127.0.0.1', port });
  await new Promise<void>((resolve) => {
    const stop = () => void app.close().finally(resolve);
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
}

export interface Child {
  name: string;
  url: string;
  proc: ChildProcess;
  stderrTail: () => string;
  stop(): Promise<void>;
}

export async function startChild(name: string, args: string[], env: NodeJS.ProcessEnv, url: string, nodeArgs: string[] = []): Promise<Child> {
  // stdout (JSON log lines) to /dev/null: the process pays for producing its logs, not for a reader.
  const proc = spawn(process.execPath, [...nodeArgs, BIN, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let tail = '';
  proc.stderr?.on('data', (c: Buffer) => {
    tail = (tail + c.toString()).slice(-4000);
  });
  const child: Child = {
    name,
    url,
    proc,
    stderrTail: () => tail,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${name} exited while starting (code ${proc.exitCode}):\n${tail}`);
    try {
      const r = await fetch(`${url}/healthz`);
      if (r.ok) return child;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      await child.stop();
      throw new Error(`${name} did not answer ${url}/healthz within 60 s:\n${tail}`);
    }
    await sleep(100);
  }
}

interface CannonRound {
  rps: number;
  ok: number;
  non2xx: number;
  errors: number;
  timeouts: number;
  p50: number;
  p99: number;
  durationS: number;
}

async function cannon(url: string, connections: number, durationSec: number, auth: Record<string, string> = {}): Promise<CannonRound> {
  const latencies: number[] = [];
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon(
      {
        url: `${url}/generated-images`,
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: BODY,
        connections,
        duration: durationSec,
      },
      (err: unknown, res: autocannon.Result) => (err ? reject(err instanceof Error ? err : new Error('autocannon failed')) : resolve(res)),
    );
    instance.on('response', (_client, _status, _bytes, responseTime) => {
      latencies.push(responseTime);
    });
  });
  return {
    rps: result['2xx'] / result.duration,
    ok: result['2xx'],
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    p50: median(latencies),
    p99: quantile(latencies, 0.99),
    durationS: result.duration,
  };
}

function printTimes(label: string, xs: number[]) {
  out(`   ${pad(label, 46)} p50 ${pad(ms(median(xs)), 10)} p99 ${pad(ms(quantile(xs, 0.99)), 10)} mean ${ms(mean(xs))}`);
}

export async function runServiceBench(options: ServiceBenchOptions = {}): Promise<void> {
  const rounds = options.rounds ?? 3;
  const durationSec = options.durationSec ?? 10;
  const warmupSec = options.warmupSec ?? 2;
  const connections = options.connections ?? 50;
  const jobs = options.jobs ?? 200;
  const logLevel = options.logLevel ?? 'info';
  const started = performance.now();

  out(`t2i service benchmark  (${os.cpus().length} cores, ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version}, ${os.platform()} ${os.release()})`);
  out(
    `parameters: autocannon ${connections} connections, ${rounds} measured rounds x ${durationSec} s per server (alternating, real first), ${warmupSec} s warm-up each;`,
  );
  out(`            POST body ${BODY}; API child LOG_LEVEL=${logLevel} (stdout to /dev/null); ${jobs} jobs sequential + ${jobs} burst, 1 worker`);
  out("note: load generator, both servers, Postgres, Redis and Swift share this machine's cores.");

  let services: LocalServices | undefined;
  const children: Child[] = [];
  const cleanups: Array<() => Promise<unknown>> = [];
  try {
    const t0 = performance.now();
    services = await startServices();
    await applyMigrations(services.postgres.url);
    out(`services: postgres, redis, s3 (swift) up and migrated in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const apiPort = await freePort();
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      ...servicesEnv(services, 't2i-bench'),
      // Throughput of accepted submissions: back-pressure would turn the later ones into 503s.
      MAX_QUEUE_DEPTH: '0',
      // Likewise the per-key rate limit and the tenant's quotas (the path still authenticates every request).
      RATE_LIMIT_MAX: '0',
      TENANT_MAX_IN_FLIGHT: '0',
      TENANT_DAILY_PIXEL_STEPS: '0',
      // No worker announces itself here: the bench's model is known, so its jobs are taken and wait.
      KNOWN_MODELS: BENCH_MODEL,
      HOST: '127.0.0.1',
      PORT: String(apiPort),
      LOG_LEVEL: logLevel,
      LOG_PRETTY: 'false',
    };
    const config = loadConfig(env, 'api');
    const qs = queueSettings(config);
    const keyDb = createPrismaClient(services.postgres.url, { poolMax: 1 });
    const auth = { authorization: `Bearer ${(await new AccountsService(createAccountsRepo(keyDb)).createKey('bench')).key}` };
    await keyDb.$disconnect();
    out(`            queue "${qs.queueName}", DATABASE_POOL_MAX=${config.DATABASE_POOL_MAX} (API), bucket ${config.STORAGE_BUCKET}`);

    const db = new pg.Client({ connectionString: services.postgres.url });
    await db.connect();
    cleanups.push(() => db.end());
    const adminRedis = createRedis(services.redis.url);
    const adminQueue = new Queue(queueNameFor(qs.queueName, BENCH_MODEL), { connection: adminRedis });
    adminQueue.on('error', () => undefined);
    cleanups.push(async () => {
      await adminQueue.close();
      adminRedis.disconnect();
    });
    const reset = async () => {
      await adminQueue.obliterate({ force: true });
      if (await adminQueue.isPaused()) await adminQueue.resume();
      // TRUNCATE fires no row triggers: the tenants' usage counters are reset with the rows.
      await db.query('TRUNCATE job_attempts, webhook_attempts, webhook_deliveries, idempotency_keys, generated_images');
      await db.query('UPDATE tenants SET in_flight = 0, pixel_steps_today = 0');
    };

    const barePort = await freePort();
    const [api, bare] = await Promise.all([
      startChild('api', ['api'], env, `http://127.0.0.1:${apiPort}`),
      startChild('bare', ['bench', '--bare-server', String(barePort)], { ...process.env }, `http://127.0.0.1:${barePort}`),
    ]);
    children.push(api, bare);

    // ---------------------------------------------------------------------------------------
    out(`\n1. accepted POST /generated-images per second (autocannon, ${connections} connections, ${durationSec} s rounds)`);
    await cannon(api.url, connections, warmupSec, auth);
    await cannon(bare.url, connections, warmupSec);
    await reset();
    const real: CannonRound[] = [];
    const bares: CannonRound[] = [];
    const line = (name: string, r: CannonRound) =>
      `${pad(name, 5)} ${pad(r.rps.toFixed(0), 6)} req/s  p50 ${pad(ms(r.p50), 9)} p99 ${pad(ms(r.p99), 9)} 2xx ${pad(String(r.ok), 7)} non-2xx ${r.non2xx}  errors ${r.errors}  timeouts ${r.timeouts}`;
    for (let i = 0; i < rounds; i++) {
      const r = await cannon(api.url, connections, durationSec, auth);
      real.push(r);
      const queued = await adminQueue.getJobCounts('waiting', 'prioritized');
      await reset();
      const b = await cannon(bare.url, connections, durationSec);
      bares.push(b);
      out(`   round ${i + 1}: ${line('real', r)}  (queued ${(queued.waiting ?? 0) + (queued.prioritized ?? 0)})`);
      out(`            ${line('bare', b)}  ratio real/bare ${(r.rps / b.rps).toFixed(3)}`);
    }
    const sum = (rs: CannonRound[], k: 'non2xx' | 'errors' | 'timeouts') => rs.reduce((a, r) => a + r[k], 0);
    const medRps = (rs: CannonRound[]) => median(rs.map((r) => r.rps));
    out(`   median: real ${medRps(real).toFixed(0)} req/s (p50 ${ms(median(real.map((r) => r.p50)))}, p99 ${ms(median(real.map((r) => r.p99)))})`);
    out(`           bare ${medRps(bares).toFixed(0)} req/s (p50 ${ms(median(bares.map((r) => r.p50)))}, p99 ${ms(median(bares.map((r) => r.p99)))})`);
    out(
      `           throughput ratio real/bare = ${(medRps(real) / medRps(bares)).toFixed(3)} (median of per-round ratios ${median(real.map((r, i) => r.rps / bares[i]!.rps)).toFixed(3)})`,
    );
    const failures = sum(real, 'non2xx') + sum(real, 'errors') + sum(bares, 'non2xx') + sum(bares, 'errors');
    out(
      `   non-2xx: real ${sum(real, 'non2xx')}, bare ${sum(bares, 'non2xx')}; errors: real ${sum(real, 'errors')}, bare ${sum(bares, 'errors')}; timeouts: real ${sum(real, 'timeouts')}, bare ${sum(bares, 'timeouts')}  ${failures === 0 ? 'OK' : 'NOT ZERO'}`,
    );
    const rps = medRps(real);
    const p99 = median(real.map((r) => r.p99));
    out(
      `   goal: >= ${INTAKE_GOAL.rps} accepted/s with p99 < ${INTAKE_GOAL.p99Ms} ms: ${rps >= INTAKE_GOAL.rps && p99 < INTAKE_GOAL.p99Ms ? 'met' : 'NOT MET'} (${rps.toFixed(0)} req/s, p99 ${ms(p99)})`,
    );

    await bare.stop();
    await reset();

    // ---------------------------------------------------------------------------------------
    out(`\n1b. where the API's time goes: one ${durationSec} s round against an API started with --cpu-prof`);
    const profDir = mkdtempSync(path.join(os.tmpdir(), 't2i-api-profile-'));
    cleanups.push(async () => rmSync(profDir, { recursive: true, force: true }));
    const profPort = await freePort();
    const profiled = await startChild('api (profiled)', ['api'], { ...env, PORT: String(profPort) }, `http://127.0.0.1:${profPort}`, [
      '--cpu-prof',
      `--cpu-prof-dir=${profDir}`,
    ]);
    const pr = await cannon(profiled.url, connections, durationSec, auth);
    await profiled.stop();
    await reset();
    const profile = readdirSync(profDir)
      .filter((f) => f.endsWith('.cpuprofile'))
      .map((f) => path.join(profDir, f))
      .sort((a, b) => statSync(b).size - statSync(a).size)[0];
    out(`   ${line('real', pr)} (profiling costs some of it)`);
    if (profile) {
      const summary = summarizeCpuProfile(profile);
      out(
        `   busy ${(summary.busyMs / 1000).toFixed(1)} s of CPU in the API process; by package: ${summary.byPackage.map((p) => `${p.name} ${(100 * p.share).toFixed(1)}%`).join(', ')}`,
      );
      out('   top frames by self time:');
      for (const f of summary.topFrames) out(`     ${pad(`${(100 * f.share).toFixed(1)}%`, 6)} ${f.frame}`);
    } else {
      out('   no profile was written (the API did not exit cleanly)');
    }

    // ---------------------------------------------------------------------------------------
    out(`\n2. queue path per job, zero-cost engine (fixed 64x64 PNG at once), 1 worker in this process, real repo + storage`);
    const png = await fixedPng();
    const engine = {
      async generate(params: GenerateParams): Promise<Generation> {
        return {
          png,
          seed: params.seed ?? 0,
          width: params.width ?? 64,
          height: params.height ?? 64,
          numSteps: params.numSteps ?? 1,
          guidanceScale: params.guidanceScale ?? 0,
          scheduler: params.scheduler ?? 'euler',
          timings: { encodeMs: 0, denoiseMs: 0, decodeMs: 0, totalMs: 0, sessionRunMs: 0 },
          warnings: [],
        };
      },
    };
    const workerDb = createPrismaClient(services.postgres.url, { poolMax: 3 });
    cleanups.push(() => workerDb.$disconnect());
    const realStorage = createStorage(storageOptions(config));
    await realStorage.ensureBucket();
    // The real storage, timed: the processor calls putPng then stat once per job.
    const putMs: number[] = [];
    const storage = {
      async putPng(key: string, buf: Buffer, opts?: { signal?: AbortSignal }) {
        const t = performance.now();
        try {
          return await realStorage.putPng(key, buf, opts);
        } finally {
          putMs.push(performance.now() - t);
        }
      },
      remove: (key: string) => realStorage.remove(key),
      list: (prefix: string) => realStorage.list(prefix),
      read: (key: string) => realStorage.read(key),
    };
    // The real worker logs at the same level; its lines go nowhere here, as the API's do.
    const logger = pino({ level: logLevel }, pino.destination({ dest: '/dev/null', sync: true }));
    const processJob = createProcessor({
      repo: createImagesRepo(workerDb),
      storage,
      engine,
      objectKeyFor,
      workerId: 'bench-worker',
      modelName: BENCH_MODEL,
      runDefaults: { numSteps: 1, guidanceScale: 0, width: 64, height: 64, scheduler: 'euler' },
      progressIntervalMs: config.PROGRESS_INTERVAL_MS,
      log: logger,
      unrecoverable: (m) => new UnrecoverableError(m),
    });
    const waiters = new Map<string, () => void>();
    const doneEarly = new Set<string>();
    const done = (id: string) => {
      const w = waiters.get(id);
      if (w) {
        waiters.delete(id);
        w();
      } else doneEarly.add(id);
    };
    const whenDone = (id: string) =>
      new Promise<void>((resolve) => {
        if (doneEarly.delete(id)) resolve();
        else waiters.set(id, resolve);
      });
    let workerErrors = 0;
    const consumer = createConsumer(
      services.redis.url,
      qs,
      BENCH_MODEL,
      async (job) => {
        try {
          await processJob({ imageId: job.imageId, attempt: job.attempt, maxAttempts: job.maxAttempts, log: logger.child({ jobId: job.id }) });
        } catch (err) {
          workerErrors++;
          throw err;
        } finally {
          done(job.imageId);
        }
      },
      () => void workerErrors++,
    );
    cleanups.push(() => consumer.close());
    void consumer.worker.run();
    await consumer.worker.waitUntilReady();

    const post = async (): Promise<string> => {
      const r = await fetch(`${api.url}/generated-images`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: BODY });
      if (r.status !== 201) throw new Error(`POST answered ${r.status}: ${await r.text()}`);
      return ((await r.json()) as { id: string }).id;
    };

    // Warm-up: connections, prepared statements, JIT.
    for (let i = 0; i < 10; i++) await whenDone(await post());
    await reset();
    putMs.length = 0;

    // One at a time.
    const seqIds: string[] = [];
    const clientMs: number[] = [];
    const tSeq = performance.now();
    for (let i = 0; i < jobs; i++) {
      const t = performance.now();
      const id = await post();
      await whenDone(id);
      clientMs.push(performance.now() - t);
      seqIds.push(id);
    }
    const seqWall = performance.now() - tSeq;
    const seq = await rowTimes(db, seqIds);
    const seqPut = putMs.splice(0);
    out(`   a) ${jobs} jobs one at a time (next POST after the previous job is stored): ${(jobs / (seqWall / 1000)).toFixed(1)} jobs/s`);
    printTimes('enqueue->stored (finished-created-gen_ms)', seq.overhead);
    const o50 = median(seq.overhead);
    const o99 = quantile(seq.overhead, 0.99);
    out(
      `   ${pad('goal: p50 <= ' + OVERHEAD_GOAL.p50Ms + ' ms, p99 <= ' + OVERHEAD_GOAL.p99Ms + ' ms', 46)} ${o50 <= OVERHEAD_GOAL.p50Ms && o99 <= OVERHEAD_GOAL.p99Ms ? 'met' : 'NOT MET'}`,
    );
    printTimes('  of which created->started (queue, claim)', seq.pickup);
    printTimes('  of which started->finished - gen_ms', seq.work);
    printTimes('    of which storage putObject, checked by its digest and ETag (worker side)', seqPut);
    printTimes('client: POST sent -> job stored', clientMs);

    await reset();

    // Burst: all at once.
    const tBurst = performance.now();
    const burstIds = await Promise.all(Array.from({ length: jobs }, () => post()));
    const tAccepted = performance.now() - tBurst;
    await Promise.all(burstIds.map(whenDone));
    const burstWall = performance.now() - tBurst;
    const burst = await rowTimes(db, burstIds);
    const burstPut = putMs.splice(0);
    out(`   b) burst: ${jobs} POSTs at once (all accepted after ${ms(tAccepted)}), 1 worker`);
    printTimes('enqueue->stored (finished-created-gen_ms)', burst.overhead);
    printTimes('  of which created->started (queue wait)', burst.pickup);
    printTimes('  of which started->finished - gen_ms', burst.work);
    printTimes('    of which storage putObject, checked by its digest and ETag (worker side)', burstPut);
    out(
      `   throughput: ${(jobs / (burst.spanMs / 1000)).toFixed(1)} jobs/s (first created_at -> last finished_at ${ms(burst.spanMs)}); client wall ${ms(burstWall)} = ${(jobs / (burstWall / 1000)).toFixed(1)} jobs/s`,
    );
    out(`   worker errors: ${workerErrors}  ${workerErrors === 0 ? 'OK' : 'NOT ZERO'}`);
    out(`\ntotal benchmark time ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } finally {
    for (const c of children) await c.stop().catch(() => undefined);
    for (const f of cleanups.reverse()) await f().catch(() => undefined);
    await services?.stop();
  }
}
