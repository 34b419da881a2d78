import os from 'node:os';
import { createAccountsRepo } from '../adapters/accounts-repo.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { applyMigrations } from '../adapters/db/migrate.js';
import { AccountsService } from '../core/accounts.js';
import { freePort, servicesEnv, startServices, type LocalServices } from '../dev/services.js';
import { quantile, startChild, type Child } from './service-bench.js';
import { openSse, type SseEvent } from './sse-client.js';

/**
 * `t2i bench stream` (npm run bench:stream): how long a denoising step takes to reach a client
 * as an event, on real processes and services (startServices: Postgres, Redis, Swift).
 *
 * Two API processes (A takes the submissions, B serves the streams) and one worker on the test
 * engine (each step a timer of `stepMs`, so the machine is not busy generating). For every job,
 * `subscribers` SSE clients follow it through B. The worker stamps each event with its wall
 * clock when the engine thread's step reaches it (`at`, epoch ms to 1 µs); a client's latency
 * is its receive time minus `at`, on the same machine's clock. The path measured: worker ->
 * Redis (XADD + PUBLISH in one script) -> B's subscriber connection -> SSE over HTTP -> client.
 * Previews add their WebP encoding in the worker, and are reported apart.
 */

export interface StreamBenchOptions {
  /** Jobs, one after another. Default 30. */
  jobs?: number;
  /** Steps per job. Default 50. */
  steps?: number;
  /** Test engine step time. Default 20 ms. */
  stepMs?: number;
  /** SSE clients per job. Default 4. */
  subscribers?: number;
}

/** The goal: a progress bar that keeps up with a fast GPU's steps (LCM and turbo take ~50 ms). */
export const STREAM_GOAL = { p50Ms: 10, p99Ms: 50 } as const;

const out = (line: string) => process.stdout.write(`${line}\n`);

function summary(xs: number[]): string {
  if (xs.length === 0) return 'none';
  const f = (v: number) => `${v.toFixed(2)} ms`;
  return `n=${xs.length}  p50 ${f(quantile(xs, 0.5))}  p90 ${f(quantile(xs, 0.9))}  p99 ${f(quantile(xs, 0.99))}  max ${f(Math.max(...xs))}`;
}

export async function runStreamBench(options: StreamBenchOptions = {}): Promise<{ progress: number[]; previews: number[] }> {
  const jobs = options.jobs ?? 30;
  const steps = options.steps ?? 50;
  const stepMs = options.stepMs ?? 20;
  const subscribers = options.subscribers ?? 4;
  out(`t2i stream benchmark  (${os.cpus().length} cores, ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version})`);
  out(`parameters: ${jobs} jobs x ${steps} steps, test engine ${stepMs} ms/step, ${subscribers} SSE clients per job on the second API instance`);
  out('note: clients, two API processes, the worker, Postgres, Redis and Swift share this machine.');
  out(`load average at start (1 min): ${os.loadavg()[0]!.toFixed(2)}`);

  let services: LocalServices | undefined;
  const children: Child[] = [];
  const progress: number[] = [];
  const slowest: Array<{ ms: number; job: number; step: number }> = [];
  const previews: number[] = [];
  try {
    const t0 = performance.now();
    services = await startServices();
    await applyMigrations(services.postgres.url);
    out(`services: up and migrated in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    // A tenant's key, as clients send it: the stream is authenticated once, at connect.
    const keyDb = createPrismaClient(services.postgres.url, { poolMax: 1 });
    const auth = { authorization: `Bearer ${(await new AccountsService(createAccountsRepo(keyDb)).createKey('bench-stream')).key}` };
    await keyDb.$disconnect();
    const env = (extra: Record<string, string>): NodeJS.ProcessEnv => ({
      ...process.env,
      ...servicesEnv(services!, 't2i-bench-stream'),
      HOST: '127.0.0.1',
      LOG_LEVEL: 'warn',
      LOG_PRETTY: 'false',
      PREVIEW_INTERVAL_MS: '500',
      ...extra,
    });
    const [portA, portB, portW] = [await freePort(), await freePort(), await freePort()];
    const a = `http://127.0.0.1:${portA}`;
    const b = `http://127.0.0.1:${portB}`;
    children.push(
      ...(await Promise.all([
        startChild('api A', ['api'], env({ PORT: String(portA) }), a),
        startChild('api B', ['api'], env({ PORT: String(portB) }), b),
        startChild(
          'worker',
          ['worker', '--test-engine', '--test-step-ms', String(stepMs)],
          env({ WORKER_METRICS_PORT: String(portW) }),
          `http://127.0.0.1:${portW}`,
        ),
      ])),
    );

    for (let j = 0; j < jobs; j++) {
      const res = await fetch(`${a}/generated-images`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: 'a red circle', num_steps: steps, width: 512, height: 512, seed: j }),
      });
      if (res.status !== 201) throw new Error(`POST answered ${res.status}: ${await res.text()}`);
      const { id } = (await res.json()) as { id: string };
      const runs = await Promise.all(
        Array.from({ length: subscribers }, async () => {
          const conn = await openSse(`${b}/generated-images/${id}/events`, auth);
          const seen: SseEvent[] = [];
          for await (const e of conn.events) seen.push(e);
          return seen;
        }),
      );
      for (const seen of runs) {
        const last = seen.at(-1);
        if (last?.event !== 'done') throw new Error(`job ${id}: the stream ended with ${last?.event ?? 'nothing'}, not done`);
        const stepsSeen = seen.filter((e) => e.event === 'progress');
        if (stepsSeen.length !== steps) throw new Error(`job ${id}: ${stepsSeen.length} progress events, expected ${steps}`);
        // Replayed history (events from before the client connected) is not live latency.
        const live = (e: SseEvent) => e.receivedAt - (e.data.at as number);
        const connectedAt = seen[0]!.receivedAt;
        for (const e of seen) {
          if ((e.data.at as number) < connectedAt) continue;
          if (e.event === 'progress') {
            progress.push(live(e));
            slowest.push({ ms: live(e), job: j, step: e.data.step as number });
          }
          if (e.event === 'preview') previews.push(live(e));
        }
      }
    }
    out(`load average at the end (1 min): ${os.loadavg()[0]!.toFixed(2)}`);
    out('');
    out(`progress event, worker step -> client: ${summary(progress)}`);
    out(`preview event (WebP encoding included): ${summary(previews)}`);
    const top = slowest.sort((x, y) => y.ms - x.ms).slice(0, 5);
    out(`slowest progress events: ${top.map((t) => `job ${t.job} step ${t.step} ${t.ms.toFixed(0)} ms`).join(', ')}`);
    const p50 = quantile(progress, 0.5);
    const p99 = quantile(progress, 0.99);
    const met = p50 <= STREAM_GOAL.p50Ms && p99 <= STREAM_GOAL.p99Ms;
    out(
      `goal: p50 <= ${STREAM_GOAL.p50Ms} ms and p99 <= ${STREAM_GOAL.p99Ms} ms: ${met ? 'met' : 'MISSED'} (p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms)`,
    );
    return { progress, previews };
  } finally {
    await Promise.allSettled(children.map((c) => c.stop()));
    await services?.stop();
  }
}
