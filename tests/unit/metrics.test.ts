import { describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { createApiMetrics } from '../../src/api/metrics.js';
import { AccountsService, type AccountsRepo } from '../../src/core/accounts.js';
import { ImagesService, type ImagesRepo, type JobQueue } from '../../src/core/images.js';
import { createLogger } from '../../src/core/logger.js';
import { ModelCatalog } from '../../src/core/models.js';
import { createWorkerMetrics } from '../../src/worker/metrics.js';

/** Metric modules without services (fake repositories that know no job and no key): registries per instance, the /metrics token, queue-depth timeouts. */

const TOKEN = 'a-long-metrics-token-123';
const SCRAPE = { authorization: `Bearer ${TOKEN}` };

/** A unit-test fake: the only request these tests send to a job route asks for an unknown id. */
function fakeRepo(): ImagesRepo {
  const unused = (name: string) => async (): Promise<never> => {
    throw new Error(`fake repo: ${name} is not used by the metrics tests`);
  };
  return {
    get: async () => null,
    create: unused('create'),
    sweepIdempotencyKeys: unused('sweepIdempotencyKeys'),
    createMany: unused('createMany'),
    list: unused('list'),
    usage: unused('usage'),
    markDeleted: unused('markDeleted'),
    clearObjects: unused('clearObjects'),
    discard: unused('discard'),
    assignModel: unused('assignModel'),
    findExpired: unused('findExpired'),
    findDeletedWithObjects: unused('findDeletedWithObjects'),
    unfairPriorities: unused('unfairPriorities'),
    setPriority: unused('setPriority'),
    startAttempt: unused('startAttempt'),
    setProgress: unused('setProgress'),
    succeed: unused('succeed'),
    fail: unused('fail'),
    failAny: unused('failAny'),
    requestCancel: unused('requestCancel'),
    finishCanceled: unused('finishCanceled'),
    release: unused('release'),
    findStale: unused('findStale'),
    markSuperseded: unused('markSuperseded'),
    attempts: unused('attempts'),
    ping: async () => undefined,
  };
}

/** A unit-test fake of an empty queue. */
const fakeQueue: JobQueue = { enqueue: async () => undefined, enqueueMany: async () => undefined, remove: async () => false, depth: async () => 0 };

/** A unit-test fake of the accounts store that knows no key: job routes answer 401. */
function fakeAccountsRepo(): AccountsRepo {
  const unused = (name: string) => async (): Promise<never> => {
    throw new Error(`fake accounts repo: ${name} is not used by the metrics tests`);
  };
  return {
    keyByHash: async () => null,
    ensureTenant: unused('ensureTenant'),
    insertKey: unused('insertKey'),
    listKeys: unused('listKeys'),
    revokeKey: unused('revokeKey'),
    touchKey: unused('touchKey'),
    setTenantLimits: unused('setTenantLimits'),
    listTenants: unused('listTenants'),
  };
}

/** `null`: no METRICS_TOKEN. */
function app(token: string | null = TOKEN) {
  const images = new ImagesService({
    repo: fakeRepo(),
    queue: fakeQueue,
    storage: {
      presignGet: async () => ({ url: '', expiresAt: new Date() }),
      removeImageObjects: async () => undefined,
      putInput: async () => undefined,
      remove: async () => undefined,
    },
    models: new ModelCatalog({ fleet: { members: async () => [], profiles: async () => [] } }),
  });
  return buildApp({
    images,
    accounts: new AccountsService(fakeAccountsRepo()),
    logger: createLogger({ name: 'api', level: 'silent' }),
    bodyLimit: 65_536,
    metrics: createApiMetrics(),
    metricsToken: token ?? undefined,
  });
}

describe('API metrics', () => {
  it('keeps a registry per app, so two apps in one process count apart', async () => {
    const [a, b] = [app(), app()];
    await a.inject({ method: 'GET', url: '/healthz' });
    await a.inject({ method: 'GET', url: '/healthz' });
    await b.inject({ method: 'GET', url: '/generated-images/00000000-0000-4000-8000-000000000000' });
    const ta = (await a.inject({ method: 'GET', url: '/metrics', headers: SCRAPE })).body;
    const tb = (await b.inject({ method: 'GET', url: '/metrics', headers: SCRAPE })).body;
    expect(ta).toMatch(/http_requests_total\{method="GET",route="\/healthz",status_class="2xx"\} 2/);
    expect(tb).not.toContain('route="/healthz"');
    expect(tb).toMatch(/http_requests_total\{method="GET",route="\/generated-images\/:id",status_class="4xx"\} 1/);
    await Promise.all([a.close(), b.close()]);
  });

  it('asks for the bearer token when METRICS_TOKEN is set', async () => {
    const a = app(TOKEN);
    expect((await a.inject({ method: 'GET', url: '/metrics' })).statusCode).toBe(401);
    expect((await a.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer wrong-token-of-same-len' } })).statusCode).toBe(401);
    const ok = await a.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer a-long-metrics-token-123' } });
    expect(ok.statusCode).toBe(200);
    expect(ok.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
    await a.close();
  });

  it('serves no /metrics on the API without METRICS_TOKEN: its port faces users', async () => {
    const a = app(null);
    const res = await a.inject({ method: 'GET', url: '/metrics' });
    expect(res.statusCode).toBe(404);
    expect(res.body).not.toContain('http_requests_total');
    await a.close();
  });
});

describe('worker metrics', () => {
  it('reports queue depth by state, waiting including prioritized', async () => {
    const m = createWorkerMetrics();
    m.watchQueue(async () => ({ waiting: 3, prioritized: 2, active: 1, delayed: 4, failed: 5, completed: 99 }), 1_000);
    const text = await m.registry.metrics();
    expect(text).toContain('t2i_queue_jobs{state="waiting"} 5');
    expect(text).toContain('t2i_queue_jobs{state="active"} 1');
    expect(text).toContain('t2i_queue_jobs{state="delayed"} 4');
    expect(text).toContain('t2i_queue_jobs{state="failed"} 5');
    expect(text).not.toContain('state="completed"');
  });

  it('leaves queue depth out of a scrape when Redis does not answer in time, and counts the miss', async () => {
    const m = createWorkerMetrics();
    let slow = false;
    m.watchQueue(() => (slow ? new Promise<never>(() => undefined) : Promise.resolve({ waiting: 1 })), 50);
    expect(await m.registry.metrics()).toContain('t2i_queue_jobs{state="waiting"} 1');
    slow = true;
    const started = Date.now();
    const text = await m.registry.metrics();
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(text).not.toMatch(/t2i_queue_jobs\{/);
    // Metrics are collected concurrently: the miss shows from the next scrape on.
    expect(await m.registry.metrics()).toMatch(/t2i_queue_counts_errors_total [12]\n/);
  });

  it('counts outcomes, retries and the jobs in progress', async () => {
    const m = createWorkerMetrics();
    m.job.started(1.5);
    expect(await m.registry.metrics()).toContain('t2i_jobs_in_progress 1');
    m.job.step(0.2);
    m.job.finished('succeeded', 3);
    m.job.started();
    m.job.finished('retried', 1);
    m.job.started();
    m.job.finished('failed', 1);
    const text = await m.registry.metrics();
    expect(text).toContain('t2i_jobs_in_progress 0');
    expect(text).toContain('t2i_jobs_finished_total{outcome="succeeded"} 1');
    expect(text).toContain('t2i_jobs_finished_total{outcome="failed"} 1');
    expect(text).toContain('t2i_jobs_finished_total{outcome="skipped"} 0');
    expect(text).not.toContain('t2i_jobs_finished_total{outcome="retried"}');
    expect(text).toContain('t2i_job_retries_total 1');
    expect(text).toContain('t2i_job_duration_seconds_count{outcome="retried"} 1');
    expect(text).toContain('t2i_job_queue_wait_seconds_count 1');
    expect(text).toContain('t2i_denoise_step_duration_seconds_count 1');
  });

  it('labels every series with the model once it is loaded; the info metric names its variant', async () => {
    const m = createWorkerMetrics();
    m.watchQueue(async () => ({ waiting: 2 }), 1_000);
    m.setModel({ model: 'sdxl-turbo', variant: 'SDXL Turbo', schedulers: ['euler'], provider: 'cpu', version: '0.1.0', loadSeconds: 3 });
    m.job.started(0.5);
    m.job.finished('succeeded', 2);
    const text = await m.registry.metrics();
    expect(text).toContain('t2i_queue_jobs{state="waiting",model="sdxl-turbo"} 2');
    expect(text).toContain('t2i_jobs_finished_total{outcome="succeeded",model="sdxl-turbo"} 1');
    expect(text).toContain('t2i_worker_info{variant="SDXL Turbo",schedulers="euler",provider="cpu",version="0.1.0",model="sdxl-turbo"} 1');
    // Every sample line of every t2i series carries it.
    const samples = text.split('\n').filter((l) => l.startsWith('t2i_'));
    expect(samples.length).toBeGreaterThan(10);
    for (const line of samples) expect(line, line).toContain('model="sdxl-turbo"');
  });
});
