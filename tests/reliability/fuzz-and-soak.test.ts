import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { hostileBodies } from '../support/fuzz.js';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { startApi as startApiInProcess } from '../../src/api/main.js';
import { startWorker } from '../../src/worker/main.js';
import { loadConfig, type Config } from '../../src/config.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { freePort, servicesEnv, type LocalServices } from '../../src/dev/services.js';
import { createTestKey } from '../support/accounts.js';
import { quantile } from '../../src/bench/service-bench.js';
import { configEnv, saveReport, spawnService, startOwnSystem, testEngineArgs, type ServiceProcess } from '../support/processes.js';

/**
 * Property-based fuzzing of POST /generated-images over HTTP, and a soak: a steady stream of
 * submissions for SOAK_SECONDS (default 300) against the API and two workers on the zero-cost
 * synthetic engine, with every process's memory sampled. Figures are added to
 * reliability-report.json.
 */

const SOAK_SECONDS = Number(process.env.SOAK_SECONDS ?? 300);
const SOAK_RATE_PER_S = 20;
const FUZZ_RUNS = 3_000;
const WARMUP_REQUESTS = 4_000;
const HEAP_ROUNDS = 5;
const HEAP_JOBS_PER_ROUND = 500;

let services: LocalServices;
let base: Config;
let db: Db;
let auth: { authorization: string };
const procs: ServiceProcess[] = [];
/** Submissions at these rates must not be refused for being too many: limits have their own tests. */
const NO_LIMITS = { RATE_LIMIT_MAX: '0', TENANT_MAX_IN_FLIGHT: '0', TENANT_DAILY_PIXEL_STEPS: '0', KNOWN_MODELS: 'test-engine' };
const report: Record<string, unknown> = {};

beforeAll(async () => {
  ({ services, config: base } = await startOwnSystem('t2i-soak', { MAX_QUEUE_DEPTH: '0', ...NO_LIMITS, LOG_LEVEL: 'warn' }));
  db = createPrismaClient(base.DATABASE_URL);
  ({ auth } = await createTestKey(base.DATABASE_URL));
}, 120_000);

afterEach(async () => {
  await Promise.allSettled(procs.splice(0).map((p) => p.stop()));
});

afterAll(async () => {
  await db?.$disconnect();
  await services?.stop();
  saveReport(report);
}, 60_000);

/**
 * A small old space makes V8 collect often, so RSS follows live memory instead of the
 * collector's appetite: without it the floor of a healthy process can rise for minutes before
 * the first major collection. A real leak then shows as growth, or as a crash.
 */
const SOAK_NODE_OPTIONS = '--max-old-space-size=160';
/** The API's /metrics token here: the soak reads every process's memory from its own metrics. */
const METRICS_TOKEN = 'soak-metrics-token-0123456789';

/** A process's memory as it reports it (prom-client's process and V8 gauges), in bytes. */
interface Memory {
  rss: number;
  /** The anonymous part of RSS (/proc/PID/status RssAnon): what allocations hold, not mapped files. */
  rssAnon: number;
  /** V8's committed heap: what the collector holds from the system, used or not. */
  heapTotal: number;
  heapUsed: number;
  /** Major (mark-compact) collections so far (prom-client's nodejs_gc_duration_seconds count). */
  majorGcs: number;
}

async function memoryOf(pid: number, metricsUrl: string, auth?: string): Promise<Memory> {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rssAnon = Number(/^RssAnon:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN) * 1024;
  const text = await (await fetch(`${metricsUrl}/metrics`, auth ? { headers: { authorization: `Bearer ${auth}` } } : {})).text();
  // A worker's series carry its model as a label; `labels` picks one series by its labels;
  // `absent` is the value of a series not written yet (a count before its first event).
  const value = (name: string, labels = '', absent?: number) => {
    const m = new RegExp(`^${name}(?:\\{[^}]*${labels}[^}]*\\})? (\\S+)`, 'm').exec(text);
    if (!m && absent !== undefined) return absent;
    if (!m) throw new Error(`${metricsUrl}/metrics has no ${name}${labels}`);
    return Number(m[1]);
  };
  return {
    rssAnon,
    rss: value('process_resident_memory_bytes'),
    heapTotal: value('nodejs_heap_size_total_bytes'),
    heapUsed: value('nodejs_heap_size_used_bytes'),
    majorGcs: value('nodejs_gc_duration_seconds_count', 'kind="major"', 0),
  };
}

async function startApi(): Promise<string> {
  const port = await freePort();
  const proc = spawnService('api', 'api', configEnv(base, { PORT: String(port), LOG_LEVEL: 'info', NODE_OPTIONS: SOAK_NODE_OPTIONS, METRICS_TOKEN }));
  procs.push(proc);
  await proc.waitForLine((l) => l.msg === 'api listening');
  return `http://127.0.0.1:${port}`;
}

const valid = { prompt: 'a red circle', negative_prompt: null, num_steps: 10, guidance_scale: 7.5, seed: 1, width: 512, height: 512, scheduler: 'euler' };

/** Bodies over a wide alphabet (tests/support/fuzz.ts): control characters, lone surrogates, huge numbers, deep nesting. */
const bodies = hostileBodies(valid);

describe('bad input and long runs, with real processes', () => {
  it(`fuzz: ${FUZZ_RUNS} generated bodies, zero 5xx, every rejection in problem+json`, async () => {
    const url = await startApi();
    const seen = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(bodies, async (body) => {
        const r = await fetch(`${url}/generated-images`, {
          method: 'POST',
          headers: { ...auth, 'content-type': 'application/json' },
          body,
          signal: AbortSignal.timeout(5_000),
        });
        seen.set(r.status, (seen.get(r.status) ?? 0) + 1);
        expect(r.status).toBeLessThan(500);
        const json = (await r.json()) as Record<string, unknown>;
        if (r.status === 201) {
          expect(json.status).toBe('queued');
        } else {
          expect(r.headers.get('content-type')).toContain('application/problem+json');
          expect(json.status).toBe(r.status);
          for (const k of ['title', 'detail', 'type']) expect(typeof json[k], k).toBe('string');
        }
      }),
      { numRuns: FUZZ_RUNS },
    );
    report.fuzz = { cases: FUZZ_RUNS, byStatus: Object.fromEntries(seen), status5xx: [...seen].filter(([s]) => s >= 500).reduce((a, [, n]) => a + n, 0) };
  });

  it(`soak: ${SOAK_SECONDS} s of steady submissions, zero errors, memory of every process flat`, async () => {
    const url = await startApi();
    const api = procs[0]!;
    const workers = await Promise.all(
      ['soak-a', 'soak-b'].map(async (id) => {
        const w = spawnService(id, 'worker', configEnv(base, { WORKER_ID: id, LOG_LEVEL: 'info', NODE_OPTIONS: SOAK_NODE_OPTIONS }), testEngineArgs(0));
        procs.push(w);
        await w.waitForLine((l) => l.msg === 'worker ready');
        return w;
      }),
    );
    const watched = [api, ...workers];
    // Warm-up, not measured: allocators and caches grow to their working size in the first few
    // thousand requests (measured: the API's RSS rises from ~230 to ~300 MB over 3,000 requests
    // while its heap after a full collection stays at ~72 MB), so the steady phase starts warm.
    const submitOne = (i: number) =>
      fetch(`${url}/generated-images`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: `soak ${i}`, num_steps: 4, width: 64, height: 64 }),
        signal: AbortSignal.timeout(5_000),
      });
    for (let i = 0; i < WARMUP_REQUESTS; i += 10) {
      const batch = await Promise.all(Array.from({ length: 10 }, (_, k) => submitOne(-(i + k))));
      expect(batch.map((r) => r.status)).toEqual(Array(10).fill(201));
    }
    const metricsUrls = [url, ...workers.map((w) => String(w.lines.find((l) => l.msg === 'worker ready')?.metricsUrl))];
    const samples: Array<{ t: number; mem: Memory[] }> = [];
    const accepted: string[] = [];
    const failures: string[] = [];
    const started = Date.now();
    let sampling = true;
    // Settles with the error that stopped it (awaited, and thrown, once the submissions are done).
    const sampler = (async () => {
      while (sampling) {
        const t = (Date.now() - started) / 1000;
        samples.push({ t, mem: await Promise.all(metricsUrls.map((u, k) => memoryOf(watched[k]!.pid, u, k === 0 ? METRICS_TOKEN : undefined))) });
        await new Promise((r) => setTimeout(r, 2_500));
      }
    })().then(
      () => undefined,
      (err: unknown) => (err instanceof Error ? err : new Error(String(err))),
    );
    const inFlight = new Set<Promise<void>>();
    let n = 0;
    while (Date.now() - started < SOAK_SECONDS * 1000) {
      const due = started + (n * 1000) / SOAK_RATE_PER_S;
      if (due > Date.now()) await new Promise((r) => setTimeout(r, due - Date.now()));
      const i = n++;
      const p = submitOne(i).then(
        async (r) => {
          if (r.status === 201) accepted.push(((await r.json()) as { id: string }).id);
          else failures.push(`${r.status} ${await r.text()}`);
        },
        (err: unknown) => void failures.push(String(err)),
      );
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
    }
    await Promise.all(inFlight);
    sampling = false;
    const samplerError = await sampler;
    if (samplerError !== undefined) throw samplerError;
    // Every accepted job finishes (the warm-up left a backlog; two workers take ~25 jobs/s here).
    const deadline = Date.now() + 60_000 + ((WARMUP_REQUESTS + accepted.length) / 10) * 1000;
    let open = Infinity;
    while (open > 0 && Date.now() < deadline) {
      open = await db.generatedImage.count({ where: { status: { in: ['queued', 'running'] } } });
      if (open > 0) await new Promise((r) => setTimeout(r, 250));
    }
    const byStatus = await db.generatedImage.groupBy({ by: ['status'], _count: true });
    const errorLines = watched.flatMap((p) => p.lines.filter((l) => l.level >= 50).map((l) => `${p.name}: ${l.msg}`));

    // Memory, in two parts that a leak must grow and that garbage collection does not move:
    // - native: anonymous RSS minus V8's committed heap (buffers, sockets, libuv, addons, the
    //   allocator); file-backed pages are left out: the node binary's code and data fault in as
    //   code paths first run, slowly after other work evicted them from the page cache (a run
    //   after the whole suite measured 25 MB/min of RSS growth that way), and no leak is a file;
    // - JS: the heap in use.
    // RSS itself also holds V8's committed but unused pages, which its memory reducer hands back
    // and takes again 40 MB at a time with no leak at all (measured here: RSS 252 -> 209 -> 247 MB
    // within a minute while the heap in use stayed at 53-60 MB), so its floors swing by tens of
    // MB a minute either way; it is reported, not judged. The run after its first sixth (warm-up)
    // is cut into five windows; each trend is the least-squares slope of the windows' medians.
    // A leak raises every sample, so it moves every median; what no leak does barely moves them:
    // - native memory: the allocator (glibc malloc) moves it both ways for a while. Measured in
    //   the API after the fuzz test: native at 74 MB, then 28 s at 48 MB after malloc returned
    //   free pages to the system, then back at 72-74 MB for the remaining 140 s. The windows'
    //   lowest samples (48, 60, 73, 73, 73) made that one trough a "leak" of 10 MB/min; their
    //   medians (74, 73, 73, 74, 74) are flat, as the memory was;
    // - the heap in use is a sawtooth of garbage cut by each major collection (every ~13 s in
    //   the API, ~25 s in a worker, here), and even right after one it varies by ~10 MB with
    //   what the young generation holds then. The lowest sample of a window is one draw of that
    //   (a worker's: 74, 71, 73, 77, 72 MB, whose slope swung up to 2.55 MB/min between runs);
    //   the median of a window that spans whole cycles sits at the same level each time (81.5,
    //   84, 80.5, 81.5, 80.5). So the process must collect about once a window (as many major
    //   collections as windows over the run; measured: 9-25), or the test says it does not.
    const warm = samples.filter((s) => s.t >= SOAK_SECONDS / 6);
    const windows = 5;
    const span = (SOAK_SECONDS * 5) / 6 / windows;
    const windowed = Array.from({ length: windows }, (_, w) =>
      warm.filter((s) => s.t >= SOAK_SECONDS / 6 + w * span && s.t < SOAK_SECONDS / 6 + (w + 1) * span),
    ).filter((win) => win.length > 0);
    const floorSlope = (of: (m: Memory) => number, k: number): number =>
      slopeMbPerMin(
        windowed.map((win): [number, number] => {
          const low = win.reduce((a, b) => (of(b.mem[k]!) < of(a.mem[k]!) ? b : a));
          return [low.t, of(low.mem[k]!) / 2 ** 20];
        }),
      );
    const medianSlope = (of: (m: Memory) => number, k: number): number =>
      slopeMbPerMin(windowed.map((win): [number, number] => [median(win.map((s) => s.t)), median(win.map((s) => of(s.mem[k]!))) / 2 ** 20]));
    const native = (m: Memory) => m.rssAnon - m.heapTotal;
    const rssMb = watched.map((p, k) => ({
      process: p.name,
      firstMb: round(warm[0]!.mem[k]!.rss / 2 ** 20),
      lastMb: round(warm.at(-1)!.mem[k]!.rss / 2 ** 20),
      rssSlopeMbPerMin: round(floorSlope((m) => m.rss, k)),
      nativeMb: windowed.map((win) => round(median(win.map((s) => native(s.mem[k]!))) / 2 ** 20)),
      nativeSlopeMbPerMin: round(medianSlope(native, k)),
      heapUsedMb: windowed.map((win) => round(median(win.map((s) => s.mem[k]!.heapUsed)) / 2 ** 20)),
      heapUsedSlopeMbPerMin: round(medianSlope((m) => m.heapUsed, k)),
      majorGcsPerWindow: windowed.map((win) => win.at(-1)!.mem[k]!.majorGcs - win[0]!.mem[k]!.majorGcs),
    }));
    expect(failures.slice(0, 5)).toEqual([]);
    expect(errorLines.slice(0, 5)).toEqual([]);
    expect(open).toBe(0);
    for (const p of watched) expect(p.running, `${p.name} still running`).toBe(true);
    // Every job ever accepted (the fuzz test's too, which waited for these workers) succeeded.
    expect(Object.fromEntries(byStatus.map((g) => [g.status, g._count]))).toEqual({ succeeded: await db.generatedImage.count() });
    // Flat: under 3 MB a minute of growth of native memory and of the heap in use once warm, in
    // every process (the in-process heap test below is the precise one for the JS heap).
    // Shorter runs (SOAK_SECONDS below 120, for a quick local try) have too few samples per
    // window for a slope to mean anything: they report it without judging it.
    if (SOAK_SECONDS >= 120) {
      for (const m of rssMb) {
        const majors = m.majorGcsPerWindow.reduce((a, b) => a + b, 0);
        expect(majors, `major collections of ${m.process} per window: ${m.majorGcsPerWindow.join(', ')}`).toBeGreaterThanOrEqual(windows);
        expect(m.nativeSlopeMbPerMin, `native memory (anonymous RSS - V8 heap) slope of ${m.process}`).toBeLessThan(3);
        expect(m.heapUsedSlopeMbPerMin, `heap-in-use slope of ${m.process}`).toBeLessThan(3);
      }
    }
    report.soak = {
      warmupRequests: WARMUP_REQUESTS,
      seconds: SOAK_SECONDS,
      ratePerSecond: SOAK_RATE_PER_S,
      submitted: n,
      accepted: accepted.length,
      failures: failures.length,
      jobs: Object.fromEntries(byStatus.map((g) => [g.status, g._count])),
      errorLogLines: errorLines.length,
      memory: rssMb,
      slopeBoundMbPerMin: { native: 3, heapUsed: 3 },
    };
  });

  it('heap after full collections stays flat across thousands of jobs (API and worker in this process)', async () => {
    const gc = (globalThis as { gc?: () => void }).gc;
    expect(gc, 'run with --expose-gc (vitest.config.ts sets it for this project)').toBeDefined();
    const config = loadConfig(
      {
        ...servicesEnv(services, 't2i-heap'),
        MAX_QUEUE_DEPTH: '0',
        ...NO_LIMITS,
        HOST: '127.0.0.1',
        PORT: '0',
        WORKER_METRICS_PORT: '0',
        QUEUE_NAME: 'heap',
      },
      'any',
    );
    const silent = pino({ level: 'silent' });
    const api = await startApiInProcess(config, { logger: silent });
    const worker = await startWorker(config, { logger: silent, testEngine: { stepMs: 0 } });
    try {
      const heapMb: number[] = [];
      for (let round = 0; round < HEAP_ROUNDS; round++) {
        const ids: string[] = [];
        for (let i = 0; i < HEAP_JOBS_PER_ROUND; i += 10) {
          await Promise.all(
            Array.from({ length: 10 }, async () => {
              const r = await fetch(`${api.url}/generated-images`, {
                method: 'POST',
                headers: { ...auth, 'content-type': 'application/json' },
                body: JSON.stringify({ prompt: 'heap', num_steps: 4, width: 64, height: 64 }),
              });
              expect(r.status).toBe(201);
              ids.push(((await r.json()) as { id: string }).id);
            }),
          );
        }
        // This round's jobs only: rows other tests left queued on their own queue are not ours to wait for.
        while ((await db.generatedImage.count({ where: { id: { in: ids }, status: { in: ['queued', 'running'] } } })) > 0) {
          await new Promise((r) => setTimeout(r, 200));
        }
        gc!();
        gc!();
        heapMb.push(round2(process.memoryUsage().heapUsed / 2 ** 20));
      }
      // The first round warms caches; after it the live heap must not grow with the work done.
      const warm = heapMb.slice(1);
      expect(Math.max(...warm) - Math.min(...warm)).toBeLessThan(3);
      report.heapAfterGc = {
        jobsPerRound: HEAP_JOBS_PER_ROUND,
        heapUsedMb: heapMb,
        growthAfterFirstRoundMb: round2(Math.max(...warm) - Math.min(...warm)),
        boundMb: 3,
      };
    } finally {
      await worker.close();
      await api.close();
    }
  });
});

function slopeMbPerMin(points: Array<[number, number]>): number {
  const n = points.length;
  const mx = points.reduce((a, [x]) => a + x, 0) / n;
  const my = points.reduce((a, [, y]) => a + y, 0) / n;
  const num = points.reduce((a, [x, y]) => a + (x - mx) * (y - my), 0);
  const den = points.reduce((a, [x]) => a + (x - mx) ** 2, 0);
  return (num / den) * 60;
}

const median = (xs: number[]) => quantile(xs, 0.5);
const round = (v: number) => Math.round(v * 100) / 100;
const round2 = round;
