/**
 * Observability against the running system: the API and a worker (oracle model) in-process on
 * real Postgres, Redis and S3, scraped by a real Prometheus (Debian's) loaded with
 * deploy/prometheus/alerts.yml. After some jobs and requests, every query of the Grafana
 * dashboard and every rule of alerts.yml is evaluated through Prometheus' HTTP API.
 *
 * How alert rules are checked: Prometheus must load each rule with health "ok", evaluate it
 * without error, and every recording rule must return numbers. An alert's expression is a
 * condition that is (rightly) empty while the system is healthy, so it is split at its top-level
 * and/or/unless, each operand's trailing comparison with a constant is removed, and each operand
 * must then return data: that proves the metrics and recording rules it compares exist and have
 * the labels the expression selects on, which is what an empty-because-misspelt alert would lack.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApi, type RunningApi } from '../../src/api/main.js';
import type { Config } from '../../src/config.js';
import { createLogger } from '../../src/core/logger.js';
import { startWorker, type RunningWorker } from '../../src/worker/main.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const ALERTS = path.join(ROOT, 'deploy/prometheus/alerts.yml');
const DASHBOARD = path.join(ROOT, 'deploy/grafana/dashboards/t2i.json');

/** Over 77 CLIP tokens: the engine warns that the prompt was truncated, quoting the dropped words. */
const LONG_PROMPT = `a red circle on the left, ${Array.from({ length: 90 }, (_, i) => `word${i}`).join(' ')} zanzibarquokka`;

function captureLogs(name: string, level: 'info' | 'debug', secrets: string[]) {
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString().split('\n').filter(Boolean));
      cb();
    },
  });
  return { lines, logger: createLogger({ name, level, pretty: false, destination, secrets }) };
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const why = last === undefined ? '' : `: ${last instanceof Error ? last.message : JSON.stringify(last)}`;
      throw new Error(`timed out waiting for ${what}${why}`);
    }
    await sleep(250);
  }
}

interface PromSample {
  metric: Record<string, string>;
  value?: [number, string];
  values?: [number, string][];
}

class Prometheus {
  private constructor(
    readonly url: string,
    private readonly proc: ChildProcess,
    private readonly dir: string,
    readonly stderr: string[],
  ) {}

  static async start(targets: { api: string; worker: string }, metricsToken: string): Promise<Prometheus> {
    const dir = await mkdtemp(path.join(os.tmpdir(), 't2i-prometheus-'));
    const port = await freePort();
    const config = {
      global: { scrape_interval: '1s', scrape_timeout: '1s', evaluation_interval: '1s' },
      rule_files: [ALERTS],
      scrape_configs: [
        // METRICS_TOKEN, as deploy/prometheus/prometheus.yml gives it (the API serves no /metrics without one).
        { job_name: 'api', authorization: { credentials: metricsToken }, static_configs: [{ targets: [targets.api] }] },
        { job_name: 'worker', authorization: { credentials: metricsToken }, static_configs: [{ targets: [targets.worker] }] },
      ],
    };
    // JSON is YAML.
    await writeFile(path.join(dir, 'prometheus.yml'), JSON.stringify(config, null, 2));
    const stderr: string[] = [];
    const proc = spawn(
      'prometheus',
      [
        `--config.file=${path.join(dir, 'prometheus.yml')}`,
        `--storage.tsdb.path=${path.join(dir, 'data')}`,
        `--web.listen-address=127.0.0.1:${port}`,
        '--log.level=warn',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    proc.stderr?.on('data', (c: Buffer) => stderr.push(c.toString()));
    const prom = new Prometheus(`http://127.0.0.1:${port}`, proc, dir, stderr);
    await until('Prometheus to be ready', 30_000, async () => {
      if (proc.exitCode !== null) throw new Error(`prometheus exited with ${proc.exitCode}: ${stderr.join('')}`);
      return (await fetch(`${prom.url}/-/ready`)).ok ? true : undefined;
    });
    return prom;
  }

  async api<T>(pathAndQuery: string): Promise<T> {
    const res = await fetch(`${this.url}${pathAndQuery}`);
    const body = (await res.json()) as { status: string; data: T; error?: string; errorType?: string };
    if (body.status !== 'success') throw new Error(`${pathAndQuery}: ${body.errorType}: ${body.error}`);
    return body.data;
  }

  async query(expr: string): Promise<{ resultType: string; result: PromSample[] | [number, string] }> {
    return this.api(`/api/v1/query?query=${encodeURIComponent(expr)}`);
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null) {
      const exited = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      await Promise.race([exited, sleep(5_000).then(() => this.proc.kill('SIGKILL'))]);
    }
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Resolves once Prometheus has started a scrape of every target after `since` (ms since the epoch). */
async function scrapedAfter(prom: Prometheus, since: number): Promise<void> {
  await until('a scrape of both targets', 30_000, async () => {
    const data = await prom.api<{ activeTargets: { labels: { job?: string }; lastScrape: string; health: string }[] }>('/api/v1/targets');
    const fresh = data.activeTargets.filter((t) => t.health === 'up' && Date.parse(t.lastScrape) > since).map((t) => t.labels.job);
    return fresh.includes('api') && fresh.includes('worker') ? true : undefined;
  });
}

/** Resolves once every rule was evaluated after a scrape that started after `since`. */
async function evaluatedAfter(prom: Prometheus, since: number): Promise<void> {
  await scrapedAfter(prom, since);
  const scraped = Date.now();
  await until('every rule to be evaluated over the last scrape', 30_000, async () => {
    const data = await prom.api<{ groups: { rules: { lastEvaluation: string }[] }[] }>('/api/v1/rules');
    const rules = data.groups.flatMap((g) => g.rules);
    return rules.length > 0 && rules.every((r) => Date.parse(r.lastEvaluation) > scraped) ? true : undefined;
  });
}

/** The numbers of an instant query's result (vector or scalar). */
function numbers(data: { resultType: string; result: PromSample[] | [number, string] }): number[] {
  if (data.resultType === 'scalar') return [Number((data.result as [number, string])[1])];
  return (data.result as PromSample[]).map((s) => Number(s.value?.[1]));
}

/** Grafana's built-in variables as Grafana would substitute them for a 1 s scrape interval. */
function grafanaExpr(expr: string): string {
  return (
    expr
      .replaceAll('$__rate_interval', '1m')
      .replaceAll('${__rate_interval}', '1m')
      .replaceAll('$__interval', '1s')
      .replaceAll('$__range', '5m')
      // The dashboard's model variable set to All (its allValue): every model.
      .replaceAll('$model', '.*')
  );
}

/** Splits a PromQL condition at its top-level and/or/unless, and drops each part's trailing comparison with a number. */
function conditionOperands(expr: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let quote: string | undefined;
  let start = 0;
  const text = expr.replace(/\s+/g, ' ').trim();
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote) {
      if (c === quote && text[i - 1] !== '\\') quote = undefined;
      continue;
    }
    if (c === '"' || c === "'") quote = c;
    else if ('([{'.includes(c)) depth++;
    else if (')]}'.includes(c)) depth--;
    else if (depth === 0) {
      const m = /^ (and|or|unless) /.exec(text.slice(i));
      if (m) {
        parts.push(text.slice(start, i));
        start = i + m[0].length;
        i = start - 1;
      }
    }
  }
  parts.push(text.slice(start));
  return parts.map((p) => p.replace(/\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[\d.]+(e[+-]?\d+)?\s*$/i, '').trim());
}

let config: Config;
let api: RunningApi | undefined;
let worker: RunningWorker | undefined;
let prom: Prometheus | undefined;
let workerLogs: ReturnType<typeof captureLogs>;
let apiLogs: ReturnType<typeof captureLogs>;
const jobIds: string[] = [];
const METRICS_TOKEN = `metrics-${randomUUID()}`;
const SCRAPE = { headers: { authorization: `Bearer ${METRICS_TOKEN}` } };
/** The tenant's key, which no log line may contain. */
let key: string;

async function request(method: string, url: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${api!.url}${url}`, {
    method,
    headers: { authorization: `Bearer ${key}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await res.text();
  return { status: res.status, json: text.startsWith('{') ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

async function submit(prompt: string): Promise<string> {
  const r = await request('POST', '/generated-images', { prompt, num_steps: 3, width: 64, height: 64, seed: 7 });
  expect(r.status).toBe(201);
  const id = r.json.id as string;
  jobIds.push(id);
  return id;
}

async function waitDone(id: string): Promise<Record<string, unknown>> {
  return until(`job ${id} to finish`, 60_000, async () => {
    const r = await request('GET', `/generated-images/${id}`);
    return ['succeeded', 'failed', 'canceled'].includes(r.json.status as string) ? r.json : undefined;
  });
}

/** Requests of every kind the dashboard splits by: 201, 200, 400, 404 on a route, 404 on no route. */
async function someRequests(): Promise<void> {
  expect((await request('GET', '/generated-images?limit=5')).status).toBe(200);
  expect((await request('GET', '/generated-images/not-a-uuid')).status).toBe(404);
  expect((await request('GET', '/no/such/route/12345')).status).toBe(404);
  expect((await request('POST', '/generated-images', { prompt: 'x', num_steps: 999 })).status).toBe(400);
  expect((await request('GET', '/healthz')).status).toBe(200);
}

beforeAll(async () => {
  config = await isolatedConfig({ METRICS_TOKEN });
  ({ key } = await createTestKey(config.DATABASE_URL));
  const secrets = [config.STORAGE_SECRET_KEY, config.STORAGE_ACCESS_KEY];
  workerLogs = captureLogs('worker', 'info', secrets);
  apiLogs = captureLogs('api', 'info', secrets);
  [api, worker] = await Promise.all([startApi(config, { logger: apiLogs.logger }), startWorker(config, { logger: workerLogs.logger })]);
  prom = await Prometheus.start({ api: new URL(api.url).host, worker: new URL(worker.metricsUrl).host }, METRICS_TOKEN);

  // Counters must be seen before they move: rate() ignores what happened before a series' first scrape.
  await until('both targets to be scraped', 30_000, async () => {
    const data = await prom!.query('up');
    const up = (data.result as PromSample[]).filter((s) => s.value?.[1] === '1').map((s) => s.metric.job);
    return up.includes('api') && up.includes('worker') ? true : undefined;
  });

  // Two rounds: label sets created in the first round (a new route or status) move in the second,
  // after a scrape has seen them.
  await someRequests();
  await waitDone(await submit(LONG_PROMPT));
  await scrapedAfter(prom, Date.now());
  await someRequests();
  const [a, b] = [await submit('a blue square'), await submit('a red circle on the left')];
  await Promise.all([waitDone(a), waitDone(b)]);
  expect((await request('GET', `/generated-images/${a}/url`)).status).toBe(200);

  // Prometheus has the jobs, and the recording rules have run over them.
  const seenAt = await until('Prometheus to see the finished jobs', 30_000, async () => {
    const n = numbers(await prom!.query('sum(t2i_jobs_finished_total{outcome="succeeded"})'));
    return n[0] !== undefined && n[0] >= 3 ? Date.now() : undefined;
  });
  await evaluatedAfter(prom, seenAt);
}, 180_000);

afterAll(async () => {
  await prom?.stop();
  await Promise.allSettled([api?.close(), worker?.close()]);
});

describe('metrics endpoints', () => {
  it('API: request counts by method, route pattern and status class, durations, sizes and process metrics', async () => {
    const text = await (await fetch(`${api!.url}/metrics`, SCRAPE)).text();
    expect(text).toContain('# TYPE http_requests_total counter');
    expect(text).toMatch(/http_requests_total\{method="POST",route="\/generated-images",status_class="2xx"\} 3/);
    expect(text).toMatch(/http_requests_total\{method="POST",route="\/generated-images",status_class="4xx"\} 2/);
    expect(text).toMatch(/http_requests_total\{method="GET",route="\/generated-images\/:id",status_class="4xx"\} 2/);
    // No route: grouped under one label value, the path is not a label.
    expect(text).toMatch(/http_requests_total\{method="GET",route="unmatched",status_class="4xx"\} 2/);
    expect(text).not.toContain('/no/such/route');
    for (const id of jobIds) expect(text).not.toContain(id);
    expect(text).toContain('http_request_duration_seconds_bucket{le="0.005"');
    expect(text).toContain('http_request_duration_seconds_bucket{le="30"');
    expect(text).toMatch(/http_request_size_bytes_count\{method="POST",route="\/generated-images"\} 5/);
    expect(text).toContain('http_response_size_bytes_bucket');
    expect(text).toContain('process_cpu_seconds_total');
    expect(text).toContain('nodejs_eventloop_lag_seconds');
  });

  it('worker: jobs by outcome, durations, queue wait, steps, queue depth by state and worker info', async () => {
    const text = await (await fetch(`${worker!.metricsUrl}/metrics`, SCRAPE)).text();
    // Every series names the worker's model.
    expect(text).toMatch(/t2i_jobs_finished_total\{outcome="succeeded",model="oracle"\} 3/);
    expect(text).toMatch(/t2i_jobs_finished_total\{outcome="failed",model="oracle"\} 0/);
    expect(text).toMatch(/t2i_job_retries_total\{model="oracle"\} 0/);
    expect(text).toMatch(/t2i_job_duration_seconds_count\{model="oracle",outcome="succeeded"\} 3/);
    expect(text).toMatch(/t2i_job_queue_wait_seconds_count\{model="oracle"\} 3/);
    // At least 3 steps per job (PNDM adds a warm-up step).
    expect(Number(/t2i_denoise_step_duration_seconds_count\{model="oracle"\} (\d+)/.exec(text)?.[1])).toBeGreaterThanOrEqual(9);
    expect(text).toMatch(/t2i_jobs_in_progress\{model="oracle"\} 0/);
    for (const state of ['waiting', 'active', 'delayed', 'failed']) expect(text).toMatch(new RegExp(`t2i_queue_jobs\\{state="${state}",model="oracle"\\} 0`));
    expect(text).toMatch(
      /t2i_worker_info\{variant="SD 1\.x\/2\.x-shaped \(text hidden size 16\)",schedulers="pndm,ddim,euler,euler_ancestral,dpmpp_2m,lcm",provider="cpu",version="[^"]+",model="oracle"\} 1/,
    );
    expect(text).toMatch(/t2i_model_load_duration_seconds\{model="oracle"\} \d/);
    expect(text).toContain('process_resident_memory_bytes');
  });
});

describe('logs', () => {
  const parsed = () => workerLogs.lines.map((l) => JSON.parse(l) as Record<string, unknown>);

  it("every worker line about a job carries its id, attempt and worker id, the engine thread's lines included", () => {
    const lines = parsed();
    const jobLines = lines.filter((l) => l.jobId !== undefined);
    expect(jobLines.length).toBeGreaterThan(3);
    for (const l of jobLines) expect(l).toMatchObject({ attempt: 1, workerId: worker!.workerId });
    const engine = jobLines.filter((l) => l.component === 'engine');
    expect(engine.length, 'the truncation warning of the long prompt').toBeGreaterThan(0);
    expect(engine[0]).toMatchObject({ jobId: jobIds[0], level: 40 });
    expect(engine[0]!.msg).toMatch(/truncated/);
    const done = jobLines.filter((l) => l.msg === 'job succeeded');
    expect(done).toHaveLength(3);
    for (const l of done) {
      expect(l.outcome).toBe('succeeded');
      expect(typeof l.durationMs).toBe('number');
    }
  });

  it('prompts, authorization headers and presigned URLs stay out of lines at info', () => {
    const all = [...workerLogs.lines, ...apiLogs.lines].join('\n');
    expect(all).not.toContain('zanzibarquokka');
    expect(all).not.toContain('a blue square');
    expect(all).not.toContain(key);
    expect(all).not.toContain(key.slice(13));
    expect(all).not.toContain('X-Amz-Signature=');
    expect(all).not.toContain(config.STORAGE_SECRET_KEY);
    // Request lines carry the request id.
    const lines = apiLogs.lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    const reqLine = lines.find((l) => l.msg === 'request completed');
    expect(typeof reqLine?.reqId).toBe('string');
    // One line per request, with what was asked and how it was answered.
    const { req, res, responseTime } = reqLine as { req?: { method?: unknown; url?: unknown }; res?: { statusCode?: unknown }; responseTime?: unknown };
    expect([typeof req?.method, typeof req?.url, typeof res?.statusCode, typeof responseTime]).toEqual(['string', 'string', 'number', 'number']);
    expect(lines.filter((l) => l.msg === 'incoming request')).toEqual([]);
    const ids = lines.filter((l) => l.msg === 'request completed').map((l) => l.reqId);
    expect(ids.length).toBeGreaterThan(0);
    expect(new Set(ids).size).toBe(ids.length);
  });
});

describe('Prometheus with the dashboard and the alert rules', () => {
  it('answers every query of every dashboard panel with data', async () => {
    const dashboard = JSON.parse(await readFile(DASHBOARD, 'utf8')) as { panels: { type: string; title: string; targets?: { expr: string }[] }[] };
    const panels = dashboard.panels.filter((p) => p.type !== 'row');
    expect(panels.length).toBeGreaterThan(10);
    const failures: string[] = [];
    for (const panel of panels) {
      expect(panel.targets?.length, panel.title).toBeGreaterThan(0);
      for (const target of panel.targets ?? []) {
        try {
          const values = numbers(await prom!.query(grafanaExpr(target.expr)));
          if (values.length === 0) failures.push(`${panel.title}: ${target.expr} returned nothing`);
          else if (!values.some((v) => Number.isFinite(v))) failures.push(`${panel.title}: ${target.expr} returned only ${values.join(', ')}`);
        } catch (err) {
          failures.push(`${panel.title}: ${(err as Error).message}`);
        }
      }
    }
    expect(failures).toEqual([]);
  });

  it('loads every rule of alerts.yml healthy, records numbers, and has data under every alert condition', async () => {
    const source = await readFile(ALERTS, 'utf8');
    const declared = [...source.matchAll(/^\s*- (record|alert): (\S+)/gm)].map((m) => m[2]!);
    interface Rule {
      name: string;
      query: string;
      type: 'recording' | 'alerting';
      health: string;
      lastError?: string;
      lastEvaluation: string;
    }
    const groups = await until('every rule to be evaluated', 20_000, async () => {
      const data = await prom!.api<{ groups: { rules: Rule[] }[] }>('/api/v1/rules');
      const rules = data.groups.flatMap((g) => g.rules);
      return rules.length === declared.length && rules.every((r) => r.health !== 'unknown') ? rules : undefined;
    });
    expect(groups.map((r) => r.name).sort()).toEqual([...declared].sort());
    expect(
      groups
        .filter((r) => r.type === 'alerting')
        .map((r) => r.name)
        .sort(),
    ).toEqual(['T2IApiLatencyHigh', 'T2IEngineRestarting', 'T2IJobFailureRatioHigh', 'T2INoWorkerUp', 'T2IQueueBacklogGrowing']);

    const failures: string[] = [];
    for (const rule of groups) {
      if (rule.health !== 'ok' || rule.lastError) failures.push(`${rule.name}: health ${rule.health} ${rule.lastError ?? ''}`);
      const exprs = rule.type === 'recording' ? [rule.name, rule.query] : conditionOperands(rule.query);
      for (const expr of exprs) {
        try {
          const values = numbers(await prom!.query(expr));
          if (!values.some((v) => Number.isFinite(v))) failures.push(`${rule.name}: ${expr} returned ${values.length ? values.join(', ') : 'nothing'}`);
        } catch (err) {
          failures.push(`${rule.name}: ${expr}: ${(err as Error).message}`);
        }
      }
    }
    expect(failures).toEqual([]);
    // A healthy system fires nothing.
    const alerts = await prom!.api<{ alerts: { labels: { alertname: string }; state: string }[] }>('/api/v1/alerts');
    expect(alerts.alerts.filter((a) => a.state === 'firing').map((a) => a.labels.alertname)).toEqual([]);
  });

  it('splits alert conditions into operands', () => {
    expect(conditionOperands('t2i:queue_waiting:max > 20 and deriv(t2i:queue_waiting:max[15m]) > 0')).toEqual([
      't2i:queue_waiting:max',
      'deriv(t2i:queue_waiting:max[15m])',
    ]);
    expect(conditionOperands('count(up{job="a and b"} == 1) or vector(0)')).toEqual(['count(up{job="a and b"} == 1)', 'vector(0)']);
    expect(conditionOperands('x < 1e-3')).toEqual(['x']);
  });
});
