/**
 * Error reporting through the real Sentry SDK to a local HTTP server standing in for Sentry's
 * ingest (POST /api/<project>/envelope/), which records the envelopes: 5xx responses and failed
 * jobs are reported with their tags, client errors are not, and no event carries a prompt, a
 * storage key or a URL. The failures are real: an API over a database without its tables, and a
 * worker whose engine (the test double, in its thread) fails with a message quoting the prompt,
 * against the real Postgres and S3.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { inject } from 'vitest';
import { createPrismaClient } from '../../src/adapters/db/client.js';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer } from '../../src/adapters/queue.js';
import { createErrorReporter, createSentryReporter } from '../../src/adapters/sentry.js';
import { createStorage, objectKeyFor } from '../../src/adapters/storage.js';
import { buildApp } from '../../src/api/app.js';
import { AccountsService } from '../../src/core/accounts.js';
import { ImagesService } from '../../src/core/images.js';
import { createLogger } from '../../src/core/logger.js';
import { packageVersion, type ErrorReporter } from '../../src/core/reporting.js';
import { queueSettings, storageOptions } from '../../src/core/wiring.js';
import { loadConfig } from '../../src/config.js';
import { createDatabase } from '../../src/dev/services.js';
import { Engine } from '../../src/engine/thread/engine-host.js';
import { createProcessor, type JobLog } from '../../src/worker/processor.js';
import { createTenant, createTestKey, insertJob } from '../support/accounts.js';
import { testFleet } from '../support/fleet.js';
import { isolatedConfig } from '../support/system.js';

const SECRET_KEY = 'storage-secret-key-9f8e7d6c';
const ACCESS_KEY = 'STORAGEACCESSKEY42';
const PROMPT = 'a lighthouse painted by a secretive otter';
const PRESIGNED = `http://s3.internal:9000/t2i-images/a.png?X-Amz-Credential=${ACCESS_KEY}%2F20260101&X-Amz-Signature=feedfacefeedface`;

/** The parts of a Sentry event the tests read. */
interface SentryEvent {
  level?: string;
  release?: string;
  environment?: string;
  tags?: Record<string, unknown>;
  extra?: Record<string, unknown>;
  request?: unknown;
  exception?: { values?: Array<{ value?: string }> };
}

interface Envelope {
  url: string;
  raw: string;
  events: SentryEvent[];
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
      const evs: SentryEvent[] = [];
      for (let i = 1; i + 1 < lines.length; i += 2) {
        if ((JSON.parse(lines[i]!) as { type: string }).type === 'event') evs.push(JSON.parse(lines[i + 1]!) as SentryEvent);
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
    // A real failure of real parts: the API's jobs in a database whose tables were never created
    // (its keys in a migrated one, so requests get past authentication).
    const s = inject('services');
    const unmigrated = await createDatabase(s.postgresUrl, `t2i_sentry_${randomUUID().slice(0, 8)}`);
    const db = createPrismaClient(unmigrated);
    const config = await isolatedConfig();
    const accountsDb = createPrismaClient(config.DATABASE_URL);
    const { key, auth } = await createTestKey(config.DATABASE_URL);
    const queue = createProducer(config.REDIS_URL, queueSettings(config));
    const r = reporter('api');
    const fleet = await testFleet(config);
    const app = buildApp({
      images: new ImagesService({ repo: createImagesRepo(db), queue, storage: createStorage(storageOptions(config)), models: fleet.catalog }),
      accounts: new AccountsService(createAccountsRepo(accountsDb)),
      logger: createLogger({ name: 'api', level: 'silent' }),
      bodyLimit: 65_536,
      reporter: r,
    });
    const headers = { ...auth, 'content-type': 'application/json' };
    const clientErrors = [
      await app.inject({ method: 'POST', url: '/generated-images', headers, payload: { prompt: PROMPT, num_steps: 0 } }),
      await app.inject({ method: 'GET', url: '/generated-images/not-an-id', headers }),
      await app.inject({ method: 'GET', url: '/nothing/here', headers }),
    ];
    expect(clientErrors.map((c) => c.statusCode)).toEqual([400, 404, 404]);
    const failed = await app.inject({ method: 'POST', url: '/generated-images?token=abc', headers, payload: { prompt: PROMPT, num_steps: 2 } });
    expect(failed.statusCode).toBe(500);
    expect(failed.body).not.toMatch(/generated_images|tenants|prisma|table|relation/i);
    await r.flush(5_000);

    const evs = events();
    expect(evs).toHaveLength(1);
    const ev = evs[0]!;
    expect(ev.tags).toMatchObject({ component: 'api', method: 'POST', route: '/generated-images', status: 500 });
    expect(ev.extra).toMatchObject({ requestId: expect.any(String) as unknown });
    expect(ev).toMatchObject({ release: 't2i@test', environment: 'test', level: 'error' });
    // The database's own reason (the first table the submission reads is missing), for the operator only.
    expect(ev.exception?.values?.[0]?.value).toMatch(/relation "tenants" does not exist/);
    expect(ev.request).toBeUndefined();
    expect(envelopes[0]!.url).toMatch(/^\/api\/42\/envelope\//);
    for (const e of envelopes) {
      expectClean(e.raw);
      expect(e.raw).not.toContain(key);
    }
    await app.close();
    await Promise.all([r.close(), queue.close(), fleet.close(), db.$disconnect(), accountsDb.$disconnect()]);
  });
});

describe('worker', () => {
  const silent: JobLog = { info() {}, warn() {}, error() {}, debug() {} };

  it('reports failed attempts tagged with job id, attempt, code, model and scheduler, without the prompt', async () => {
    const config = await isolatedConfig();
    const db = createPrismaClient(config.DATABASE_URL);
    const repo = createImagesRepo(db);
    const storage = createStorage(storageOptions(config));
    await storage.ensureBucket();
    // The test engine's [test:fail] throws an error that quotes the prompt, as engine errors may.
    const engine = await Engine.start({ test: { stepMs: 0 } });
    const r = reporter('worker');
    const process = createProcessor({
      repo,
      storage,
      engine,
      objectKeyFor,
      workerId: 'w-1',
      modelName: 'sd15',
      progressIntervalMs: 0,
      log: silent,
      unrecoverable: (m) => Object.assign(new Error(m), { name: 'UnrecoverableError' }),
      reporter: r,
    });
    const imageId = randomUUID();
    const prompt = `${PROMPT} [test:fail]`;
    await insertJob(repo, {
      id: imageId,
      tenantId: await createTenant(db),
      prompt,
      negativePrompt: 'blurry otter',
      numSteps: 2,
      guidanceScale: 9,
      seed: 1,
      width: 64,
      height: 64,
      scheduler: 'euler',
    });
    await expect(process({ imageId, jobId: imageId, attempt: 1, maxAttempts: 2, log: silent })).rejects.toThrow(/^generation_failed/);
    await expect(process({ imageId, jobId: imageId, attempt: 2, maxAttempts: 2, log: silent })).rejects.toThrow(/^generation_failed/);
    await r.flush(5_000);

    const evs = events();
    expect(evs).toHaveLength(2);
    const [retrying, final] = evs as [SentryEvent, SentryEvent];
    expect(retrying).toMatchObject({
      level: 'warning',
      tags: { component: 'worker', jobId: imageId, attempt: 1, final: false, code: 'generation_failed', model: 'sd15', scheduler: 'euler', workerId: 'w-1' },
    });
    expect(final).toMatchObject({
      level: 'error',
      tags: { jobId: imageId, attempt: 2, maxAttempts: 2, final: true, code: 'generation_failed', model: 'sd15' },
    });
    // The operator sees the engine's own message, with the prompt blanked.
    expect(final.exception?.values?.[0]?.value).toBe('the test engine failed as asked while generating "[redacted]"');
    for (const e of envelopes) {
      expectClean(e.raw);
      expect(e.raw).not.toContain('blurry otter');
    }
    await Promise.all([r.close(), engine.close(), db.$disconnect()]);
  });
});

describe('configuration', () => {
  const base = {
    DATABASE_URL: 'postgresql://x@localhost/x',
    STORAGE_ENDPOINT: 'localhost:9000',
    STORAGE_ACCESS_KEY: ACCESS_KEY,
    STORAGE_SECRET_KEY: SECRET_KEY,
  };

  it('reports only when SENTRY_DSN is set, with the package version as release unless SENTRY_RELEASE says otherwise; secrets and URLs blanked', async () => {
    expect(createErrorReporter(loadConfig(base), 'api').enabled).toBe(false);
    const r = createErrorReporter(loadConfig({ ...base, SENTRY_DSN: dsn, SENTRY_ENVIRONMENT: 'staging' }), 'worker');
    expect(r.enabled).toBe(true);
    r.capture(new Error(`boom with ${SECRET_KEY} uploading to ${PRESIGNED}`), { tags: { jobId: 'j-1' } });
    await r.flush(5_000);
    expect(events()).toHaveLength(1);
    expect(events()[0]).toMatchObject({ release: `t2i@${packageVersion()}`, environment: 'staging', tags: { component: 'worker', jobId: 'j-1' } });
    expect(packageVersion()).toMatch(/^\d+\.\d+\.\d+/);
    expectClean(envelopes[0]!.raw);
    await r.close();
  });
});
