/**
 * Who sees what (issue 11, test 1). Two tenants against a real API process, and a worker on the
 * test engine so that the job has an image: every tenant-scoped route and method, called as the
 * job's owner, as the other tenant, with no key, a malformed key, a revoked key and a key that
 * has a real prefix but the wrong secret. Only the owner ever sees the job; the others get 404 or
 * 401, and the other tenant's 404 is byte for byte the 404 of an id that never existed.
 *
 * The matrix must cover every route the app has: the test lists the routes of a real app and
 * fails on one it does not call (a route added later must be added here, and scoped).
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer } from '../../src/adapters/queue.js';
import { createStorage } from '../../src/adapters/storage.js';
import { buildApp } from '../../src/api/app.js';
import { createApiMetrics } from '../../src/api/metrics.js';
import { webAsset } from '../../src/api/web.js';
import type { Config } from '../../src/config.js';
import { AccountsService } from '../../src/core/accounts.js';
import { ModelCatalog } from '../../src/core/models.js';
import { ImagesService } from '../../src/core/images.js';
import { queueSettings, storageOptions } from '../../src/core/wiring.js';
import { createTestKey, revokeTestKey, type TestKey } from '../support/accounts.js';
import { startApiProcess, startWorkerProcess, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

interface Answer {
  status: number;
  headers: Headers;
  text: string;
}

type Who = 'owner' | 'other' | 'none' | 'malformed' | 'revoked' | 'wrong-secret';

let config: Config;
let db: Db;
let url: string;
const procs: ServiceProcess[] = [];
let owner: TestKey;
let other: TestKey;
const headersOf = {} as Record<Who, Record<string, string>>;
/** The owner's job: succeeded, with an image. */
let jobId: string;
const PROMPT = `isolation prompt ${randomUUID()}`;
/** Every answer, by who asked, for the final check that only the owner ever saw the prompt. */
const seen: Array<{ who: Who; route: string; answer: Answer }> = [];

async function call(method: string, path: string, headers: Record<string, string>, body?: unknown): Promise<Answer> {
  const res = await fetch(`${url}${path}`, {
    method,
    headers: { ...headers, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

async function waitSucceeded(id: string, headers: Record<string, string>): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const job = JSON.parse((await call('GET', `/generated-images/${id}`, headers)).text) as { status: string };
    if (job.status === 'succeeded') return;
    if (Date.now() > deadline || job.status === 'failed' || job.status === 'canceled') throw new Error(`job ${id} is ${job.status}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  owner = await createTestKey(config.DATABASE_URL, 'owner-co');
  other = await createTestKey(config.DATABASE_URL, 'other-co');
  // A second key of the owner's tenant, revoked: it must open nothing.
  const revoked = await createTestKey(config.DATABASE_URL, 'owner-co');
  await revokeTestKey(config.DATABASE_URL, revoked.prefix);
  Object.assign(headersOf, {
    owner: owner.auth,
    other: other.auth,
    none: {},
    malformed: { authorization: 'Bearer not-a-t2i-key' },
    revoked: revoked.auth,
    // The owner's real prefix with a secret that is not its own.
    'wrong-secret': { authorization: `Bearer t2i_${owner.prefix}_${'0'.repeat(64)}` },
  });
  // The matrix sends many keyless requests from one address: keep the brute-force limit out of it
  // (tests/integration/api-keys.test.ts tests that limit).
  const api = await startApiProcess(config, { AUTH_FAILURE_LIMIT: '100000' });
  procs.push(api.proc);
  url = api.url;
  procs.push(await startWorkerProcess(config, 'isolation-worker', 0));
  const created = await call('POST', '/generated-images', owner.auth, { prompt: PROMPT, num_steps: 2, width: 64, height: 64 });
  expect(created.status).toBe(201);
  jobId = (JSON.parse(created.text) as { id: string }).id;
  await waitSucceeded(jobId, owner.auth);
}, 120_000);

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.$disconnect();
});

/** Every tenant-scoped route and how to call it; `id` is the job the call is about. */
const ROUTES: Array<{ route: string; call: (who: Who, id: string) => Promise<Answer> }> = [
  {
    route: 'POST /generated-images',
    call: (w) => call('POST', '/generated-images', headersOf[w], { prompt: `made by ${w}`, num_steps: 1, width: 64, height: 64 }),
  },
  { route: 'GET /generated-images', call: (w) => call('GET', '/generated-images?limit=100', headersOf[w]) },
  { route: 'GET /generated-images/:id', call: (w, id) => call('GET', `/generated-images/${id}`, headersOf[w]) },
  { route: 'GET /generated-images/:id/url', call: (w, id) => call('GET', `/generated-images/${id}/url`, headersOf[w]) },
  { route: 'POST /generated-images/:id/cancel', call: (w, id) => call('POST', `/generated-images/${id}/cancel`, headersOf[w]) },
  { route: 'DELETE /generated-images/:id', call: (w, id) => call('DELETE', `/generated-images/${id}`, headersOf[w]) },
  { route: 'GET /usage', call: (w) => call('GET', '/usage', headersOf[w]) },
  // The client API (issue 12): live events, webhook deliveries, the OpenAI routes, discovery.
  { route: 'GET /generated-images/:id/events', call: (w, id) => call('GET', `/generated-images/${id}/events`, headersOf[w]) },
  { route: 'GET /events', call: (w) => call('GET', '/events', headersOf[w]) },
  { route: 'GET /generated-images/:id/webhook-deliveries', call: (w, id) => call('GET', `/generated-images/${id}/webhook-deliveries`, headersOf[w]) },
  {
    route: 'POST /v1/images/generations',
    call: (w) => call('POST', '/v1/images/generations', headersOf[w], { prompt: `openai by ${w}`, size: '64x64', num_steps: 1 }),
  },
  { route: 'GET /v1/models', call: (w) => call('GET', '/v1/models', headersOf[w]) },
  { route: 'GET /v1/models/:model', call: (w) => call('GET', '/v1/models/test-engine', headersOf[w]) },
  { route: 'GET /models', call: (w) => call('GET', '/models', headersOf[w]) },
  { route: 'GET /schedulers', call: (w) => call('GET', '/schedulers', headersOf[w]) },
  // The images through the API, for the web page (issue 15).
  { route: 'GET /generated-images/:id/images/:index', call: (w, id) => call('GET', `/generated-images/${id}/images/0`, headersOf[w]) },
  { route: 'GET /generated-images/:id/images/:index/thumbnail', call: (w, id) => call('GET', `/generated-images/${id}/images/0/thumbnail`, headersOf[w]) },
];
/** Routes anyone may call: probes, the token-guarded /metrics, and the API's contract and its docs page. */
const PUBLIC = [
  'GET /healthz',
  'GET /readyz',
  'GET /metrics',
  'GET /openapi.json',
  // The docs page (@fastify/swagger-ui) and its static assets.
  'GET /docs',
  'GET /docs/json',
  'GET /docs/yaml',
  'GET /docs/static/index.html',
  'GET /docs/static/swagger-initializer.js',
  'GET /docs/*',
  // The web page's files (issue 15): everything it shows comes from the routes above, with a key.
  'GET /',
  'GET /assets/index-abc.js',
  'GET /favicon.svg',
];

function problem(a: Answer): { title: string; status: number; detail: string } {
  expect(a.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  return JSON.parse(a.text) as { title: string; status: number; detail: string };
}

/** The OpenAI routes answer errors in OpenAI's shape (their clients read no other); the same facts. */
function errorOf(route: string, a: Answer): { status: number; title?: string; type?: string; code?: string | null; detail?: string } {
  if (!route.includes(' /v1/')) return problem(a);
  expect(a.headers.get('content-type')).toMatch(/^application\/json/);
  const e = (JSON.parse(a.text) as { error: { message: string; type: string; code: string | null } }).error;
  return { status: a.status, type: e.type, code: e.code, detail: e.message };
}

/** Header names, and the values that could tell two answers apart (not dates, ids or counters). */
function headerShape(h: Headers): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of h) out[k] = ['date', 'x-request-id', 'ratelimit-remaining', 'ratelimit-reset'].includes(k) ? '*' : v;
  return out;
}

/** A collaborator the route listing never calls. */
const unused = async (): Promise<never> => {
  throw new Error('not called by the route listing');
};

describe('the isolation matrix', () => {
  it('covers every route of the app except the public probes', async () => {
    const dbForApp = createPrismaClient(config.DATABASE_URL, { poolMax: 1 });
    const producer = createProducer(config.REDIS_URL, queueSettings(config));
    const app = buildApp({
      images: new ImagesService({
        repo: createImagesRepo(dbForApp),
        queue: producer,
        storage: createStorage(storageOptions(config)),
        models: new ModelCatalog({ fleet: { members: unused, profiles: unused } }),
      }),
      accounts: new AccountsService(createAccountsRepo(dbForApp)),
      logger: pino({ level: 'silent' }),
      bodyLimit: 65_536,
      metrics: createApiMetrics(),
      metricsToken: 'a-metrics-token-of-some-length',
      // Every optional area, so that their routes are listed too (none is called here).
      events: { follow: unused, heartbeatMs: 15_000 },
      webhooks: { deliveries: { forImage: unused } },
      openai: { follow: unused, readImage: unused, models: unused, waitMs: 1_000 },
      discovery: { fleet: unused, known: [], defaultOf: () => undefined, maxPixelSteps: 1 },
      imageFiles: { read: unused, thumbnail: unused },
      // A built page's shape: index.html, hashed assets, the icon.
      web: {
        assets: new Map([
          ['/', webAsset('/', 'index.html', Buffer.from('<!doctype html>'))],
          ['/assets/index-abc.js', webAsset('/assets/index-abc.js', 'index-abc.js', Buffer.from(''))],
          ['/favicon.svg', webAsset('/favicon.svg', 'favicon.svg', Buffer.from('<svg/>'))],
        ]),
      },
    });
    await app.ready();
    // printRoutes draws a tree: each level indents by 4 and names the next path segment.
    const routes: string[] = [];
    const stack: string[] = [];
    for (const line of app.printRoutes({ commonPrefix: false }).split('\n')) {
      const m = /^([│ ├└─]*)(\S+) \(([^)]+)\)/.exec(line);
      if (!m) continue;
      const depth = m[1]!.length / 4;
      stack.length = depth;
      // Under a root route (the web page's /), the first segments are printed without their slash.
      stack.push(stack.join('').endsWith('/') || m[2]!.startsWith('/') ? m[2]! : `/${m[2]!}`);
      for (const method of m[3]!.split(', ')) if (method !== 'HEAD') routes.push(`${method} ${stack.join('')}`);
    }
    await app.close();
    await producer.close();
    await dbForApp.$disconnect();
    expect(routes.length).toBeGreaterThan(5);
    const covered = [...ROUTES.map((r) => r.route), ...PUBLIC];
    expect(
      routes.filter((r) => !covered.includes(r)),
      'routes the isolation matrix does not call',
    ).toEqual([]);
  });

  for (const who of ['none', 'malformed', 'revoked', 'wrong-secret'] as const) {
    it(`${who}: 401 problem+json on every route, saying nothing about the job`, async () => {
      for (const { route, call: send } of ROUTES) {
        const a = await send(who, jobId);
        seen.push({ who, route, answer: a });
        expect(a.status, `${who} ${route}`).toBe(401);
        expect(a.headers.get('www-authenticate')).toBe('Bearer realm="t2i"');
        const p = errorOf(route, a);
        expect(p, route).toMatchObject(route.includes(' /v1/') ? { status: 401, code: 'invalid_api_key' } : { status: 401, title: 'Unauthorized' });
        expect(a.text).not.toContain(jobId);
        expect(a.text).not.toContain(owner.prefix);
      }
    });
  }

  it('an unknown key, a revoked key and a real prefix with the wrong secret get the same 401', async () => {
    const bodies = await Promise.all((['revoked', 'wrong-secret'] as const).map(async (w) => (await call('GET', '/usage', headersOf[w])).text));
    const unknown = (await call('GET', '/usage', { authorization: `Bearer t2i_${'ab12cd34'}_${'f'.repeat(64)}` })).text;
    expect(bodies).toEqual([unknown, unknown]);
    expect(JSON.parse(unknown)).toMatchObject({ detail: 'The API key is not valid: it is unknown or has been revoked.' });
  });

  it("the other tenant: every route about the owner's job answers exactly as for an id that never existed", async () => {
    for (const { route, call: send } of ROUTES.filter((r) => r.route.includes(':id'))) {
      const foreign = await send('other', jobId);
      const missingId = randomUUID();
      const missing = await send('other', missingId);
      seen.push({ who: 'other', route, answer: foreign });
      expect(foreign.status, route).toBe(404);
      expect(missing.status, route).toBe(404);
      // Same body once the id asked for is blanked, same headers (the ids have the same length).
      expect(foreign.text.replaceAll(jobId, '<id>')).toBe(missing.text.replaceAll(missingId, '<id>'));
      expect(headerShape(foreign.headers)).toEqual(headerShape(missing.headers));
      expect(errorOf(route, foreign)).toMatchObject({ status: 404, title: 'Not Found' });
    }
    // It changed nothing: the job is still the owner's, succeeded, with its prompt and image.
    const row = await db.generatedImage.findUniqueOrThrow({ where: { id: jobId } });
    expect(row).toMatchObject({ status: 'succeeded', prompt: PROMPT, deletedAt: null, cancelRequestedAt: null });
    expect(row.fileName).not.toBeNull();
  });

  it('the other tenant: its list, its usage and its submissions are its own', async () => {
    const created = await ROUTES[0]!.call('other', jobId);
    seen.push({ who: 'other', route: 'POST /generated-images', answer: created });
    expect(created.status).toBe(201);
    const mine = JSON.parse(created.text) as { id: string };
    const list = await ROUTES[1]!.call('other', jobId);
    seen.push({ who: 'other', route: 'GET /generated-images', answer: list });
    const items = (JSON.parse(list.text) as { items: Array<{ id: string }> }).items.map((i) => i.id);
    expect(items).toContain(mine.id);
    expect(items).not.toContain(jobId);
    const otherRows = await db.generatedImage.findMany({ where: { tenant: { name: 'other-co' } }, select: { id: true } });
    expect(new Set(items)).toEqual(new Set(otherRows.map((r) => r.id)));
    const usage = await ROUTES[6]!.call('other', jobId);
    seen.push({ who: 'other', route: 'GET /usage', answer: usage });
    expect(JSON.parse(usage.text)).toMatchObject({ tenant: 'other-co', jobs_today: otherRows.length, pixel_steps: { used: 64 * 64 * otherRows.length } });
  });

  it('the owner: sees, lists, links and finally deletes its job; after that it is gone for the owner too', async () => {
    const get = await ROUTES[2]!.call('owner', jobId);
    expect(get.status).toBe(200);
    expect(JSON.parse(get.text)).toMatchObject({ id: jobId, prompt: PROMPT, status: 'succeeded' });
    const list = await ROUTES[1]!.call('owner', jobId);
    expect((JSON.parse(list.text) as { items: Array<{ id: string }> }).items.map((i) => i.id)).toContain(jobId);
    const link = await ROUTES[3]!.call('owner', jobId);
    expect(link.status).toBe(200);
    expect((await fetch((JSON.parse(link.text) as { url: string }).url)).status).toBe(200);
    const png = await ROUTES.find((r) => r.route === 'GET /generated-images/:id/images/:index')!.call('owner', jobId);
    expect([png.status, png.headers.get('content-type')]).toEqual([200, 'image/png']);
    const thumbnail = await ROUTES.find((r) => r.route.endsWith('/thumbnail'))!.call('owner', jobId);
    expect([thumbnail.status, thumbnail.headers.get('content-type')]).toEqual([200, 'image/webp']);
    // Conditional GETs, as browsers and caches send them (RFC 9110: a list of tags, `*`, weak
    // forms match): 304 for the owner's copy; the other tenant gets the same 404 as without a tag.
    const etag = png.headers.get('etag')!;
    const pngPath = `/generated-images/${jobId}/images/0`;
    for (const inm of [etag, `"stale", W/${etag}`, '*'])
      expect((await call('GET', pngPath, { ...headersOf.owner, 'if-none-match': inm })).status, inm).toBe(304);
    expect((await call('GET', pngPath, { ...headersOf.owner, 'if-none-match': '"stale"' })).status).toBe(200);
    expect(thumbnail.headers.get('etag')).not.toBe(etag);
    const foreign = await call('GET', pngPath, { ...headersOf.other, 'if-none-match': etag });
    expect(foreign.status).toBe(404);
    seen.push({ who: 'other', route: 'GET /generated-images/:id/images/:index (If-None-Match)', answer: foreign });
    expect((await ROUTES[4]!.call('owner', jobId)).status).toBe(409);
    const usage = JSON.parse((await ROUTES[6]!.call('owner', jobId)).text) as { tenant: string; jobs_today: number };
    expect(usage).toMatchObject({ tenant: 'owner-co', jobs_today: 1 });
    const created = await ROUTES[0]!.call('owner', jobId);
    expect(created.status).toBe(201);
    for (const a of [get, list, link, created]) seen.push({ who: 'owner', route: '', answer: a });

    expect((await ROUTES[5]!.call('owner', jobId)).status).toBe(204);
    expect((await ROUTES[2]!.call('owner', jobId)).status).toBe(404);
  });

  it("only the owner's own answers ever carried the job's prompt or id", () => {
    expect(seen.filter((s) => s.who === 'owner' && s.answer.text.includes(PROMPT)).length).toBeGreaterThan(0);
    const leaks = seen.filter((s) => s.who !== 'owner' && (s.answer.text.includes(PROMPT) || s.answer.text.includes(jobId)));
    // The 404 of a foreign id names the id the caller sent itself; nothing else may.
    expect(leaks.filter((s) => !(s.answer.status === 404 && !s.answer.text.includes(PROMPT))).map((s) => `${s.who} ${s.route}`)).toEqual([]);
  });
});
