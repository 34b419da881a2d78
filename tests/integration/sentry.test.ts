/**
 * Error reporting through the real Sentry SDK to a local HTTP server standing in for Sentry's
 * ingest (POST /api/<project>/envelope/), which records the envelopes: 5xx responses and failed
 * jobs are reported with their tags, client errors are not, and no event carries a prompt, a
 * storage key or a URL.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createErrorReporter, createSentryReporter } from '../../src/adapters/sentry.js';
import { buildApp } from '../../src/api/app.js';
import { ImagesService, type ImageRecord, type ImagesRepo, type JobQueue } from '../../src/core/images.js';
import { createLogger } from '../../src/core/logger.js';
import { packageVersion, type ErrorReporter } from '../../src/core/reporting.js';
import { loadConfig } from '../../src/config.js';
import { createProcessor, type JobLog } from '../../src/worker/processor.js';

const SECRET_KEY = 'storage-secret-key-9f8e7d6c';
const ACCESS_KEY = 'STORAGEACCESSKEY42';
const PROMPT = 'a lighthouse painted by a secretive otter';
const PRESIGNED = `http://s3.internal:9000/t2i-images/a.png?X-Amz-Credential=${ACCESS_KEY}%2F20260101&X-Amz-Signature=feedfacefeedface`;

interface Envelope {
  url: string;
  raw: string;
  events: Record<string, any>[];
}

let ingest: Server;
let dsn: string;
const envelopes: Envelope[] = [];

function events() {
  return envelopes.flatMap((e) => e.events);
}

beforeAll(async () => {
  ingest = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      let body = Buffer.concat(chunks);
      if (req.headers['content-encoding'] === 'gzip') body = gunzipSync(body);
      const raw = body.toString('utf8');
      // An envelope: a header line, then pairs of item header and payload lines.
      const lines = raw.split('\n').filter(Boolean);
      const evs: Record<string, any>[] = [];
      for (let i = 1; i + 1 < lines.length; i += 2) {
        if ((JSON.parse(lines[i]!) as { type: string }).type === 'event') evs.push(JSON.parse(lines[i + 1]!) as Record<string, any>);
      }
      envelopes.push({ url: req.url ?? '', raw, events: evs });
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((r) => ingest.listen(0, '127.0.0.1', r));
  dsn = `http://publickey@127.0.0.1:${(ingest.address() as { port: number }).port}/42`;
});

afterAll(async () => {
  await new Promise((r) => ingest.close(r));
});

beforeEach(() => {
  envelopes.length = 0;
});

function reporter(component: string): ErrorReporter {
  return createSentryReporter({ dsn, release: 't2i@test', environment: 'test', component, secrets: [SECRET_KEY, ACCESS_KEY] });
}

function expectClean(raw: string) {
  for (const leaked of [PROMPT, 'secretive otter', SECRET_KEY, ACCESS_KEY, 'X-Amz-Signature', 'feedface', 's3.internal', 'Bearer '])
    expect(raw).not.toContain(leaked);
}

describe('API', () => {
  it('reports a 5xx with method, route and status, and never a 400 or a 404', async () => {
    const broken = new Proxy({} as ImagesRepo, {
      get: () => async () => {
        throw new Error(`database fell over while writing "${PROMPT}" with ${SECRET_KEY} to ${PRESIGNED}`);
      },
    });
    const r = reporter('api');
    const app = buildApp({
      images: new ImagesService({
        repo: broken,
        queue: { enqueue: async () => undefined, remove: async () => false, depth: async () => 0 } as unknown as JobQueue,
        storage: { presignGet: async () => ({ url: PRESIGNED, expiresAt: new Date() }) },
      }),
      logger: createLogger({ name: 'api', level: 'silent' }),
      bodyLimit: 65_536,
      reporter: r,
    });
    const headers = { authorization: 'Bearer client-token-abcdef', 'content-type': 'application/json' };
    const clientErrors = [
      await app.inject({ method: 'POST', url: '/generated-images', headers, payload: { prompt: PROMPT, num_steps: 0 } }),
      await app.inject({ method: 'GET', url: '/generated-images/not-an-id', headers }),
      await app.inject({ method: 'GET', url: '/nothing/here', headers }),
    ];
    expect(clientErrors.map((c) => c.statusCode)).toEqual([400, 404, 404]);
    const failed = await app.inject({ method: 'POST', url: '/generated-images?token=abc', headers, payload: { prompt: PROMPT, num_steps: 2 } });
    expect(failed.statusCode).toBe(500);
    expect(failed.body).not.toContain('database');
    await r.flush(5_000);

    const evs = events();
    expect(evs).toHaveLength(1);
    const ev = evs[0]!;
    expect(ev.tags).toMatchObject({ component: 'api', method: 'POST', route: '/generated-images', status: 500 });
    expect(ev.extra).toMatchObject({ requestId: expect.any(String) });
    expect(ev).toMatchObject({ release: 't2i@test', environment: 'test', level: 'error' });
    expect(ev.exception.values[0].value).toMatch(/^database fell over while writing "\[redacted\]" with \[redacted\] to \[url\]$/);
    expect(ev.request).toBeUndefined();
    expect(envelopes[0]!.url).toMatch(/^\/api\/42\/envelope\//);
    for (const e of envelopes) expectClean(e.raw);
    await app.close();
    await r.close();
  });
});

describe('worker', () => {
  const silent: JobLog = { info() {}, warn() {}, error() {}, debug() {} };
  const record = (id: string): ImageRecord => ({
    id,
    status: 'running',
    prompt: PROMPT,
    negativePrompt: 'blurry otter',
    numSteps: 2,
    guidanceScale: 9,
    seed: 1,
    width: 64,
    height: 64,
    scheduler: 'euler',
    progress: 0,
    fileName: null,
    error: null,
    attempts: 1,
    workerId: 'w-1',
    model: null,
    createdAt: new Date(),
    updatedAt: new Date(),
    startedAt: new Date(),
    finishedAt: null,
    cancelRequestedAt: null,
    generationMs: null,
  });

  it('reports failed attempts tagged with job id, attempt, model and scheduler, without the prompt', async () => {
    const r = reporter('worker');
    const repo = {
      startAttempt: async (id: string) => ({ record: record(id), attempt: 1 }),
      fail: async () => true,
      setProgress: async () => ({ owned: true, cancelRequested: false }),
      succeed: async () => true,
    } as unknown as ImagesRepo;
    const process = createProcessor({
      repo,
      storage: { putPng: async () => undefined, stat: async () => null },
      engine: {
        generate: async (params) => {
          throw new Error(`CUDA out of memory while generating "${params.prompt}" (negative "${params.negativePrompt}"), upload to ${PRESIGNED}`);
        },
      },
      objectKeyFor: (id) => `images/${id}.png`,
      workerId: 'w-1',
      modelName: 'sd15',
      progressIntervalMs: 0,
      log: silent,
      unrecoverable: (m) => Object.assign(new Error(m), { name: 'UnrecoverableError' }),
      reporter: r,
    });
    const imageId = randomUUID();
    await expect(process({ imageId, jobId: imageId, attempt: 1, maxAttempts: 3, log: silent })).rejects.toThrow(/out of memory/);
    await expect(process({ imageId, jobId: imageId, attempt: 3, maxAttempts: 3, log: silent })).rejects.toThrow(/out of memory/);
    await r.flush(5_000);

    const evs = events();
    expect(evs).toHaveLength(2);
    const [retrying, final] = evs as [Record<string, any>, Record<string, any>];
    expect(retrying).toMatchObject({
      level: 'warning',
      tags: { component: 'worker', jobId: imageId, attempt: 1, final: false, model: 'sd15', scheduler: 'euler', workerId: 'w-1' },
    });
    expect(final).toMatchObject({ level: 'error', tags: { jobId: imageId, attempt: 3, maxAttempts: 3, final: true, model: 'sd15', scheduler: 'euler' } });
    expect(final.exception.values[0].value).toContain('CUDA out of memory while generating');
    for (const e of envelopes) {
      expectClean(e.raw);
      expect(e.raw).not.toContain('blurry otter');
    }
    await r.close();
  });
});

describe('configuration', () => {
  const base = {
    DATABASE_URL: 'postgresql://x@localhost/x',
    STORAGE_ENDPOINT: 'localhost:9000',
    STORAGE_ACCESS_KEY: ACCESS_KEY,
    STORAGE_SECRET_KEY: SECRET_KEY,
  };

  it('reports only when SENTRY_DSN is set, with the package version as release unless SENTRY_RELEASE says otherwise', async () => {
    expect(createErrorReporter(loadConfig(base), 'api').enabled).toBe(false);
    const r = createErrorReporter(loadConfig({ ...base, SENTRY_DSN: dsn, SENTRY_ENVIRONMENT: 'staging' }), 'worker');
    expect(r.enabled).toBe(true);
    r.capture(new Error(`boom with ${SECRET_KEY}`), { tags: { jobId: 'j-1' } });
    await r.flush(5_000);
    expect(events()).toHaveLength(1);
    expect(events()[0]).toMatchObject({ release: `t2i@${packageVersion()}`, environment: 'staging', tags: { component: 'worker', jobId: 'j-1' } });
    expect(packageVersion()).toMatch(/^\d+\.\d+\.\d+/);
    expectClean(envelopes[0]!.raw);
    await r.close();
  });
});
