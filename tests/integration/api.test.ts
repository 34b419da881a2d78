/**
 * The HTTP API in-process, on real adapters: Postgres through Prisma, BullMQ on Redis, S3
 * (Swift) through minio. Requests go over a real socket with supertest, with one tenant's API
 * key (tests/integration/isolation.test.ts covers the others); no worker runs, so jobs stay
 * queued unless a test moves a row on itself in the database.
 */
import { randomUUID } from 'node:crypto';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import fc from 'fast-check';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import sharp from 'sharp';
import request from 'supertest';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer, type ProducerQueue } from '../../src/adapters/queue.js';
import { createStorage, objectKeyFor, type ImageStorage } from '../../src/adapters/storage.js';
import { buildApp } from '../../src/api/app.js';
import type { Config } from '../../src/config.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { AccountsService } from '../../src/core/accounts.js';
import { ImagesService } from '../../src/core/images.js';
import { GENERATION_LIMITS } from '../../src/engine/pipeline.js';
import { failure } from '../../src/core/failures.js';
import { queueNameFor } from '../../src/core/jobs.js';
import { queueSettings, storageOptions } from '../../src/core/wiring.js';
import { createTestKey } from '../support/accounts.js';
import { SD_MODEL, testFleet } from '../support/fleet.js';
import { responseChecker } from '../support/openapi.js';
import { isolatedConfig } from '../support/system.js';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const PROBLEM_CT = /^application\/problem\+json/;

let config: Config;
let db: Db;
let producer: ProducerQueue;
let storage: ImageStorage;
let app: FastifyInstance;
let redis: Redis;
let inspectQueue: Queue;
let auth: { authorization: string };
let fleet: Awaited<ReturnType<typeof testFleet>>;
/** Every answer these tests receive, checked against the OpenAPI document at the end. */
const answers: Array<{ method: string; url: string; routed: boolean; status: number; type: string | null; payload: string }> = [];

beforeAll(async () => {
  config = await isolatedConfig();
  ({ auth } = await createTestKey(config.DATABASE_URL));
  db = createPrismaClient(config.DATABASE_URL);
  producer = createProducer(config.REDIS_URL, queueSettings(config));
  storage = createStorage(storageOptions(config));
  await storage.ensureBucket();
  const repo = createImagesRepo(db);
  const logger = pino({ level: 'silent' });
  // No worker runs: an SD 1.x model is announced as its worker would announce it.
  fleet = await testFleet(config);
  const images = new ImagesService({ repo, queue: producer, storage, models: fleet.catalog, log: logger });
  app = buildApp({
    images,
    accounts: new AccountsService(createAccountsRepo(db)),
    logger,
    bodyLimit: config.BODY_LIMIT_BYTES,
    checks: { postgres: () => repo.ping(), redis: () => producer.ping(), storage: () => storage.ping() },
  });
  // Added before the routes' plugins load, so it sees every answer.
  app.addHook('onSend', async (request, reply, payload) => {
    const type = reply.getHeader('content-type');
    answers.push({
      method: request.method,
      url: request.url,
      routed: request.routeOptions.url !== undefined,
      status: reply.statusCode,
      type: typeof type === 'string' ? type : null,
      payload: typeof payload === 'string' ? payload : '',
    });
  });
  await app.ready();
  redis = new Redis(config.REDIS_URL, { maxRetriesPerRequest: null });
  inspectQueue = new Queue(queueNameFor(config.QUEUE_NAME, SD_MODEL), { connection: redis });
});

afterAll(async () => {
  await app?.close();
  await fleet?.close();
  await inspectQueue?.close();
  redis?.disconnect();
  await producer?.close();
  await db?.$disconnect();
});

/** Requests with the tenant's key, as its client sends them. */
const api = () => {
  const r = request(app.server);
  return { get: (p: string) => r.get(p).set(auth), post: (p: string) => r.post(p).set(auth), delete: (p: string) => r.delete(p).set(auth) };
};

/** Every error the API sends: problem+json with type, title, status (matching the response) and a detail. */
function expectProblem(res: request.Response, status: number): Record<string, unknown> {
  expect(res.status, JSON.stringify(res.body)).toBe(status);
  expect(res.headers['content-type']).toMatch(PROBLEM_CT);
  const body = res.body as Record<string, unknown>;
  expect(typeof body.type).toBe('string');
  expect((body.type as string).length).toBeGreaterThan(0);
  expect(typeof body.title).toBe('string');
  expect(body.status).toBe(status);
  expect(typeof body.detail).toBe('string');
  expect((body.detail as string).length).toBeGreaterThan(0);
  return body;
}

/** A 400 whose `errors` name `field` (with `rule` when given). */
function expectFieldError(res: request.Response, field: string, rule?: string): void {
  const body = expectProblem(res, 400);
  const errors = body.errors as Array<{ field: string; rule: string; message: string }>;
  expect(Array.isArray(errors)).toBe(true);
  for (const e of errors) {
    expect(typeof e.field).toBe('string');
    expect(typeof e.rule).toBe('string');
    expect(typeof e.message).toBe('string');
    expect(e.message.length).toBeGreaterThan(0);
  }
  expect(errors, JSON.stringify(errors)).toContainEqual(expect.objectContaining(rule === undefined ? { field } : { field, rule }));
  // Validation details name the field; "(body)" errors (bad JSON, not an object) say so in words.
  if (field !== '(body)') expect(body.detail as string).toContain(field);
}

/** The list route's body. supertest types every body as any; these tests name what they read. */
interface ListBody {
  items: Array<{ id: string; created_at: string }>;
  next_cursor: string | null;
}
const listBody = (res: request.Response) => res.body as ListBody;

async function createImage(body: Record<string, unknown> = { prompt: 'a red circle on the left' }) {
  const res = await api().post('/generated-images').send(body);
  expect(res.status, JSON.stringify(res.body)).toBe(201);
  return res.body as Record<string, unknown> & { id: string };
}

async function tinyPng(): Promise<Buffer> {
  return sharp({ create: { width: 8, height: 8, channels: 3, background: { r: 200, g: 10, b: 10 } } })
    .png()
    .toBuffer();
}

describe('POST /generated-images', () => {
  it("creates a queued job on the only model served, with that model's defaults filled in, a resolved seed, and a Location header", async () => {
    const prompt = `a red circle on the left ${randomUUID()}`;
    const before = Date.now();
    const res = await api().post('/generated-images').send({ prompt });
    expect(res.status).toBe(201);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    const body = res.body as Record<string, unknown> & { id: string };
    expect(body.id).toMatch(UUID_RE);
    expect(res.headers.location).toBe(`/generated-images/${body.id}`);
    expect(body).toMatchObject({
      status: 'queued',
      progress: 0,
      prompt,
      negative_prompt: null,
      // The model's own defaults (an SD 1.x model announces these), as its worker would use them.
      model: SD_MODEL,
      num_steps: 50,
      guidance_scale: 9,
      width: 512,
      height: 512,
      scheduler: 'pndm',
      strength: null,
      inputs: { image: false, mask: false },
      hold: null,
      file_name: null,
      error: null,
      started_at: null,
      finished_at: null,
    });
    expect(Number.isInteger(body.seed)).toBe(true);
    expect(body.seed as number).toBeGreaterThanOrEqual(0);
    expect(body.seed as number).toBeLessThanOrEqual(2 ** 32 - 1);
    const createdAt = Date.parse(body.created_at as string);
    expect(createdAt).toBeGreaterThanOrEqual(before - 5_000);
    expect(createdAt).toBeLessThanOrEqual(Date.now() + 5_000);

    // The row is in Postgres with the same values, seed included.
    const row = await db.generatedImage.findUnique({ where: { id: body.id } });
    expect(row).not.toBeNull();
    expect(row).toMatchObject({
      status: 'queued',
      prompt,
      negativePrompt: null,
      numSteps: 50,
      guidanceScale: 9,
      width: 512,
      height: 512,
      scheduler: 'pndm',
      progress: 0,
    });
    expect(Number(row!.seed)).toBe(body.seed);

    // One BullMQ job keyed by the row id, carrying the id only: no prompt in Redis.
    const job = await inspectQueue.getJob(body.id);
    expect(job).toBeDefined();
    expect(job!.id).toBe(body.id);
    expect(job!.data).toEqual({ imageId: body.id });
    const raw = await redis.hgetall(`bull:${queueNameFor(config.QUEUE_NAME, SD_MODEL)}:${body.id}`);
    expect(Object.keys(raw).length).toBeGreaterThan(0);
    expect(JSON.stringify(raw)).not.toContain(prompt);
  });

  it('echoes every parameter that is given, seed included', async () => {
    const sent = {
      prompt: 'a blue square',
      negative_prompt: 'green',
      num_steps: 20,
      guidance_scale: 7.5,
      seed: 42,
      width: 256,
      height: 128,
      scheduler: 'euler',
    };
    const body = await createImage(sent);
    expect(body).toMatchObject(sent);
    const again = await api().get(`/generated-images/${body.id}`);
    expect(again.body).toMatchObject(sent);
  });

  it('accepts the extremes of every range', async () => {
    await createImage({ prompt: 'x'.repeat(GENERATION_LIMITS.maxPromptChars), seed: 0, num_steps: 1, width: 64, height: 1024 });
    const top = await createImage({ prompt: 'a dot', seed: 2 ** 32 - 1, num_steps: 50, guidance_scale: 0, scheduler: 'lcm' });
    expect(top.seed).toBe(2 ** 32 - 1);
    expect(Number((await db.generatedImage.findUniqueOrThrow({ where: { id: top.id } })).seed)).toBe(2 ** 32 - 1);
  });

  describe('validation', () => {
    const cases: Array<[string, unknown, string, string]> = [
      ['missing prompt', { num_steps: 10 }, 'prompt', 'required'],
      ['empty prompt', { prompt: '' }, 'prompt', 'non_empty'],
      ['whitespace prompt', { prompt: ' \t\n ' }, 'prompt', 'non_empty'],
      ['prompt too long', { prompt: 'a'.repeat(GENERATION_LIMITS.maxPromptChars + 1) }, 'prompt', 'max'],
      ['prompt not a string', { prompt: 42 }, 'prompt', 'type'],
      ['num_steps 0', { prompt: 'a', num_steps: 0 }, 'num_steps', 'min'],
      ['num_steps 151', { prompt: 'a', num_steps: 151 }, 'num_steps', 'max'],
      ['num_steps 2.5', { prompt: 'a', num_steps: 2.5 }, 'num_steps', 'type'],
      ['num_steps "50" (no coercion)', { prompt: 'a', num_steps: '50' }, 'num_steps', 'type'],
      ['unknown field', { prompt: 'a', steps: 10 }, 'steps', 'unknown_field'],
      ['negative seed', { prompt: 'a', seed: -1 }, 'seed', 'min'],
      ['seed above 2^32-1', { prompt: 'a', seed: 2 ** 32 }, 'seed', 'max'],
      ['width not a multiple of 8', { prompt: 'a', width: 100 }, 'width', 'multiple_of'],
      ['height too small', { prompt: 'a', height: 32 }, 'height', 'min'],
      ['guidance_scale too big', { prompt: 'a', guidance_scale: 31 }, 'guidance_scale', 'max'],
      ['scheduler not in the list', { prompt: 'a', scheduler: 'lms' }, 'scheduler', 'enum'],
      ['body is an array', [{ prompt: 'a' }], '(body)', 'type'],
      ['body is a string', 'a red circle', '(body)', 'type'],
      ['body is null', null, '(body)', 'type'],
    ];
    for (const [name, body, field, rule] of cases) {
      it(`${name} → 400 naming ${field} (${rule})`, async () => {
        const count = await db.generatedImage.count();
        const res = await api().post('/generated-images').set('content-type', 'application/json').send(JSON.stringify(body));
        expectFieldError(res, field, rule);
        // Nothing was created.
        expect(await db.generatedImage.count()).toBe(count);
      });
    }

    it('lists every invalid field at once', async () => {
      const res = await api().post('/generated-images').send({ num_steps: 0, seed: -5, colour: 'red' });
      expectFieldError(res, 'prompt', 'required');
      expectFieldError(res, 'num_steps', 'min');
      expectFieldError(res, 'seed', 'min');
      expectFieldError(res, 'colour', 'unknown_field');
    });

    it('invalid JSON → 400 problem', async () => {
      const res = await api().post('/generated-images').set('content-type', 'application/json').send('{"prompt": "a red circle",');
      expectFieldError(res, '(body)', 'json');
    });

    it('an empty JSON body → 400 problem', async () => {
      const res = await api().post('/generated-images').set('content-type', 'application/json').send('');
      expectProblem(res, 400);
    });

    it('text/plain → 415 problem', async () => {
      const res = await api().post('/generated-images').set('content-type', 'text/plain').send('{"prompt":"a red circle"}');
      expectProblem(res, 415);
    });

    it('a body over BODY_LIMIT_BYTES → 413 problem', async () => {
      const big = JSON.stringify({ prompt: 'a', negative_prompt: 'x'.repeat(config.BODY_LIMIT_BYTES) });
      const res = await api().post('/generated-images').set('content-type', 'application/json').send(big);
      const body = expectProblem(res, 413);
      expect(body.detail).toContain(String(config.BODY_LIMIT_BYTES));
    });
  });
});

describe('GET /generated-images/{id}', () => {
  it('returns the job with the same fields as the create response', async () => {
    const created = await createImage({ prompt: 'a green dot', seed: 7 });
    const res = await api().get(`/generated-images/${created.id}`);
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    expect(res.body).toEqual(created);
  });

  it('an unknown uuid → 404 problem', async () => {
    const id = randomUUID();
    const body = expectProblem(await api().get(`/generated-images/${id}`), 404);
    expect(body.detail).toContain(id);
  });

  for (const id of ['abc', '1', '..%2Fx', '%00', "1'%20OR%20'1'%3D'1", `${randomUUID()}x`, 'x'.repeat(300)]) {
    it(`a malformed id (${id.slice(0, 40)}) → 404 problem, never 500`, async () => {
      expectProblem(await api().get(`/generated-images/${id}`), 404);
      expectProblem(await api().get(`/generated-images/${id}/url`), 404);
    });
  }

  it('a malformed percent-encoding → 400 problem, never 500', async () => {
    expectProblem(await api().get('/generated-images/%zz'), 400);
  });

  it('a path that climbs out ("../x") → 404 problem', async () => {
    expectProblem(await api().get('/generated-images/../x'), 404);
  });
});

describe('GET /generated-images/{id}/url', () => {
  it('a queued job → 400 "Image is not available yet. Please try again later."', async () => {
    const { id } = await createImage();
    const body = expectProblem(await api().get(`/generated-images/${id}/url`), 400);
    expect(body.detail).toBe('Image is not available yet. Please try again later.');
  });

  it('a running job → the same 400', async () => {
    const { id } = await createImage();
    await db.generatedImage.update({ where: { id }, data: { status: 'running', progress: 40, startedAt: new Date(), attempts: 1 } });
    const body = expectProblem(await api().get(`/generated-images/${id}/url`), 400);
    expect(body.detail).toBe('Image is not available yet. Please try again later.');
  });

  it('a failed job → 400 whose detail gives the public reason, with its error_code', async () => {
    const { id } = await createImage();
    const f = failure('out_of_memory');
    await db.generatedImage.update({ where: { id }, data: { status: 'failed', errorCode: f.code, error: f.message, finishedAt: new Date() } });
    const body = expectProblem(await api().get(`/generated-images/${id}/url`), 400);
    expect(body.detail).toBe(`The image could not be generated: ${f.message}`);
    expect(body).toMatchObject({ job_status: 'failed', error_code: 'out_of_memory' });
    const job = await api().get(`/generated-images/${id}`);
    expect(job.body).toMatchObject({ status: 'failed', error: { code: 'out_of_memory', message: f.message } });
  });

  it('a canceled job → 400 saying it was canceled', async () => {
    const { id } = await createImage();
    await db.generatedImage.update({ where: { id }, data: { status: 'canceled', finishedAt: new Date() } });
    const body = expectProblem(await api().get(`/generated-images/${id}/url`), 400);
    expect(body.detail).toMatch(/cancel/i);
  });

  it('a succeeded job → 200 {url, expires_at}; the URL downloads the PNG; it expires in about 1 hour (PRESIGN_TTL_SECONDS)', async () => {
    const { id } = await createImage();
    const png = await tinyPng();
    const key = objectKeyFor(id, 1);
    await storage.putPng(key, png);
    await db.generatedImage.update({ where: { id }, data: { status: 'succeeded', progress: 100, fileName: key, finishedAt: new Date() } });

    const before = Date.now();
    const res = await api().get(`/generated-images/${id}/url`);
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    const urlBody = res.body as { url: string; expires_at: string };
    expect(Object.keys(urlBody).sort()).toEqual(['expires_at', 'url']);
    const { url, expires_at } = urlBody;
    expect(config.PRESIGN_TTL_SECONDS).toBe(3600);
    expect(Math.abs(Date.parse(expires_at) - (before + 3600 * 1000))).toBeLessThan(60_000);

    const download = await fetch(url);
    expect(download.status).toBe(200);
    expect(Buffer.from(await download.arrayBuffer()).equals(png)).toBe(true);

    const job = await api().get(`/generated-images/${id}`);
    expect(job.body).toMatchObject({ status: 'succeeded', progress: 100, file_name: key });
  });
});

describe('GET /generated-images', () => {
  it('lists newest first; limit and next_cursor walk every row exactly once', async () => {
    const mine: string[] = [];
    for (let i = 0; i < 7; i++) mine.push((await createImage({ prompt: `page row ${i}` })).id);

    const first = await api().get('/generated-images?limit=3');
    expect(first.status).toBe(200);
    // Newest first: the three created last, the very last one leading.
    const firstIds = listBody(first).items.map((i) => i.id);
    expect(new Set(firstIds)).toEqual(new Set(mine.slice(-3)));
    expect(firstIds[0]).toBe(mine[6]);

    const seen: Array<{ id: string; created_at: string }> = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const res = await api()
        .get('/generated-images')
        .query({ limit: '3', ...(cursor ? { cursor } : {}) });
      expect(res.status).toBe(200);
      const { items, next_cursor } = listBody(res);
      expect(items.length).toBeLessThanOrEqual(3);
      seen.push(...items);
      cursor = next_cursor;
      if (cursor !== null) expect(items.length).toBe(3);
      expect(++pages).toBeLessThan(1000);
    } while (cursor !== null);

    const ids = seen.map((s) => s.id);
    expect(new Set(ids).size).toBe(ids.length);
    const all = await db.generatedImage.findMany({ select: { id: true } });
    expect(new Set(ids)).toEqual(new Set(all.map((r) => r.id)));
    // Ordered newest first throughout.
    for (let i = 1; i < seen.length; i++) {
      expect(Date.parse(seen[i]!.created_at)).toBeLessThanOrEqual(Date.parse(seen[i - 1]!.created_at));
    }
    // The exact order is the table's newest-first order (ties on created_at broken by id).
    const ordered = await db.generatedImage.findMany({ select: { id: true }, orderBy: [{ createdAt: 'desc' }, { id: 'desc' }] });
    expect(ids).toEqual(ordered.map((r) => r.id));
  });

  it('defaults to 20 items', async () => {
    while ((await db.generatedImage.count()) < 25) await createImage({ prompt: 'filler' });
    const res = await api().get('/generated-images');
    expect(res.status).toBe(200);
    expect(listBody(res).items).toHaveLength(20);
    expect(typeof listBody(res).next_cursor).toBe('string');
  });

  for (const limit of ['0', '-1', '101', 'abc', '2.5', '']) {
    it(`limit=${JSON.stringify(limit)} → 400 naming limit`, async () => {
      expectFieldError(await api().get(`/generated-images?limit=${encodeURIComponent(limit)}`), 'limit');
    });
  }

  for (const cursor of ['garbage', 'bm90IGEgY3Vyc29y', Buffer.from(`2024-01-01T00:00:00.000Z|not-a-uuid`).toString('base64url'), 'x'.repeat(500)]) {
    it(`cursor=${cursor.slice(0, 24)} → 400 naming cursor`, async () => {
      expectFieldError(await api().get('/generated-images').query({ cursor }), 'cursor');
    });
  }

  it('an unknown query parameter → 400', async () => {
    expectFieldError(await api().get('/generated-images?page=2'), 'page', 'unknown_field');
  });
});

describe('other routes', () => {
  it('an unknown route → 404 problem', async () => {
    const body = expectProblem(await api().get('/nope'), 404);
    expect(body.detail).toContain('/nope');
    expectProblem(await api().delete('/generated-images'), 404);
  });

  it('GET /healthz → 200', async () => {
    const res = await api().get('/healthz');
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ status: 'ok' });
  });

  it('GET /readyz → 200 with every check ok', async () => {
    const res = await api().get('/readyz');
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ status: 'ready', checks: { postgres: 'ok', redis: 'ok', storage: 'ok' } });
  });

  it('echoes a caller X-Request-Id and sets one otherwise', async () => {
    const mine = await api().get('/healthz').set('x-request-id', 'req-123');
    expect(mine.headers['x-request-id']).toBe('req-123');
    const generated = await api().get('/nope');
    expect(generated.headers['x-request-id']).toMatch(UUID_RE);
  });

  it('replaces an X-Request-Id that is long or not plain with its own', async () => {
    for (const odd of ['x'.repeat(65), 'a b', 'tab\there', '{"json":1}', '../../etc', '-starts-with-dash']) {
      const res = await api().get('/healthz').set('x-request-id', odd);
      expect(res.headers['x-request-id'], odd).toMatch(UUID_RE);
    }
    const longest = `r${'1'.repeat(63)}`;
    expect((await api().get('/healthz').set('x-request-id', longest)).headers['x-request-id']).toBe(longest);
  });

  it('sends security headers on every answer, errors included, and no CORS headers when CORS_ORIGINS is unset', async () => {
    for (const res of [await api().get('/healthz'), await api().get('/nope'), await request(app.server).get('/generated-images')]) {
      expect(res.headers['x-content-type-options']).toBe('nosniff');
      expect(res.headers['x-frame-options']).toBe('SAMEORIGIN');
      expect(res.headers['content-security-policy']).toContain("default-src 'none'");
      expect(res.headers['strict-transport-security']).toMatch(/max-age=\d+/);
      expect(res.headers['access-control-allow-origin']).toBeUndefined();
    }
    const preflight = await request(app.server)
      .options('/generated-images')
      .set('origin', 'https://app.example.com')
      .set('access-control-request-method', 'POST');
    expect(preflight.headers['access-control-allow-origin']).toBeUndefined();
  });
});

describe('property: arbitrary JSON bodies never make a 5xx', () => {
  const KEYS = ['prompt', 'negative_prompt', 'num_steps', 'guidance_scale', 'seed', 'width', 'height', 'scheduler', '__proto__', 'constructor', 'toString', ''];
  const key = fc.oneof(fc.constantFrom(...KEYS), fc.string({ maxLength: 12 }));
  const valid = {
    prompt: 'a red circle on the left',
    num_steps: 20,
    seed: 42,
    guidance_scale: 7.5,
    width: 256,
    height: 256,
    scheduler: 'ddim',
    negative_prompt: 'blue',
  };
  const mutated = fc.tuple(fc.subarray(Object.keys(valid)), fc.dictionary(key, fc.jsonValue({ maxDepth: 2 }), { maxKeys: 3 })).map(([keep, extra]) => {
    const out: Record<string, unknown> = {};
    for (const k of keep) out[k] = valid[k as keyof typeof valid];
    for (const [k, v] of Object.entries(extra)) Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
    return out;
  });
  const body = fc.oneof(
    fc.jsonValue({ maxDepth: 3 }),
    fc.dictionary(key, fc.jsonValue({ maxDepth: 2 }), { maxKeys: 6 }),
    fc.record({ prompt: fc.oneof(fc.string(), fc.jsonValue({ maxDepth: 1 })) }),
    mutated,
  );

  it('every response is a 201 job or a problem+json with a detail', async () => {
    await fc.assert(
      fc.asyncProperty(body, async (b) => {
        const res = await api()
          .post('/generated-images')
          .set('content-type', 'application/json')
          .send(JSON.stringify(b) ?? 'null');
        expect(res.status).toBeLessThan(500);
        if (res.status === 201) {
          const job = res.body as { id: string; status: string };
          expect(job.id).toMatch(UUID_RE);
          expect(job.status).toBe('queued');
        } else {
          expectProblem(res, res.status);
        }
      }),
      { numRuns: 300 },
    );
  }, 120_000);
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    const checker = responseChecker(app.swagger());
    for (const a of answers) {
      const body = a.type?.includes('json') && a.payload ? (JSON.parse(a.payload) as unknown) : undefined;
      if (a.routed) checker.check(a.method, a.url, a.status, a.type, body);
      else checker.checkUnrouted(a.method, a.url, a.status, a.type, body);
    }
    expect(answers.length).toBeGreaterThan(100);
    checker.expectNoMismatch();
  });
});
