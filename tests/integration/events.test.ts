/**
 * Live job events against real processes: two `t2i api` instances and a `t2i worker` on real
 * Postgres, Redis and S3. The worker publishes through Redis; clients follow jobs through the
 * other API instance, over Server-Sent Events (fetch) and a WebSocket (ws), as users would.
 */
import sharp from 'sharp';
import { WebSocket } from 'ws';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { freePort } from '../../src/dev/services.js';
import { configEnv, spawnService, testEngineArgs, type ServiceProcess } from '../support/processes.js';
import { quantile } from '../../src/bench/service-bench.js';
import { openSse, type SseEvent } from '../../src/bench/sse-client.js';
import { checkedFetch, responseChecker, type ResponseChecker } from '../support/openapi.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

const STEP_MS = 40;

/** Every answer is checked against the API's OpenAPI document. */
let checker: ResponseChecker | undefined;
/** The tenant whose jobs these tests follow, and another one. */
let auth: Record<string, string> = {};
let otherAuth: Record<string, string> = {};
/** fetch as the tenant, checked against the document. */
const cfetch: typeof fetch = (input, init) => checkedFetch(checker!)(input, { ...init, headers: { ...auth, ...(init?.headers as Record<string, string>) } });
const sse = (url: string, headers: Record<string, string> = {}) => openSse(url, { ...auth, ...headers }, cfetch);
const HEARTBEAT_MS = 300;

interface Running {
  config: Config;
  procs: ServiceProcess[];
  apis: string[];
}

async function startProcesses(config: Config, apis: number, workerArgs: string[]): Promise<Running> {
  const procs: ServiceProcess[] = [];
  const urls: string[] = [];
  for (let i = 0; i < apis; i++) {
    const port = await freePort();
    const p = spawnService(`api-${i}`, 'api', configEnv(config, { PORT: String(port), LOG_LEVEL: 'info' }));
    procs.push(p);
    urls.push(`http://127.0.0.1:${port}`);
  }
  const worker = spawnService('worker', 'worker', configEnv(config, { WORKER_ID: 'events-worker', LOG_LEVEL: 'info' }), workerArgs);
  procs.push(worker);
  await Promise.all([
    ...procs.slice(0, apis).map((p) => p.waitForLine((l) => l.msg === 'api listening')),
    worker.waitForLine((l) => l.msg === 'worker ready', 60_000),
  ]);
  checker ??= responseChecker(await (await fetch(`${urls[0]!}/openapi.json`)).json());
  auth = (await createTestKey(config.DATABASE_URL, 'events-co')).auth;
  otherAuth = (await createTestKey(config.DATABASE_URL, 'other-co')).auth;
  return { config, procs, apis: urls };
}

async function submit(api: string, body: Record<string, unknown>): Promise<string> {
  const res = await cfetch(`${api}/generated-images`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  expect(res.status, await res.clone().text()).toBe(201);
  return ((await res.json()) as { id: string }).id;
}

/** Reads events until `stop` says so or the stream ends. */
async function collect(events: AsyncGenerator<SseEvent>, stop: (e: SseEvent) => boolean = () => false, timeoutMs = 30_000): Promise<SseEvent[]> {
  const out: SseEvent[] = [];
  const deadline = setTimeout(() => void events.return(undefined), timeoutMs);
  try {
    for await (const e of events) {
      out.push(e);
      if (stop(e)) break;
    }
  } finally {
    clearTimeout(deadline);
  }
  return out;
}

const TERMINAL = new Set(['done', 'failed', 'canceled']);

/** What a client checks of a finished job's events: in order, progress rising, a done with a URL that serves the PNG. */
async function expectCompleteRun(events: SseEvent[], steps: number): Promise<void> {
  const ids = events.flatMap((e) => (e.id ? [e.id] : []));
  expect(new Set(ids).size, 'no event twice').toBe(ids.length);
  const statuses = events.filter((e) => e.event === 'status').map((e) => e.data.status);
  expect(statuses).toEqual(['queued', 'running']);
  const progress = events.filter((e) => e.event === 'progress').map((e) => e.data);
  expect(progress.map((p) => p.step)).toEqual(Array.from({ length: steps }, (_, i) => i + 1));
  for (let i = 1; i < progress.length; i++) expect(progress[i]!.percent as number).toBeGreaterThanOrEqual(progress[i - 1]!.percent as number);
  expect(progress.at(-1)).toMatchObject({ step: steps, total: steps, percent: 100, eta_ms: 0 });
  const last = events.at(-1)!;
  expect(last.event).toBe('done');
  expect(last.data).toMatchObject({ status: 'succeeded' });
  const file = await fetch(last.data.url as string);
  expect(file.status).toBe(200);
  expect(file.headers.get('content-type')).toBe('image/png');
  expect((await sharp(Buffer.from(await file.arrayBuffer())).metadata()).format).toBe('png');
}

async function expectPreview(e: SseEvent | { data: Record<string, unknown> }): Promise<void> {
  expect(e.data.content_type).toBe('image/webp');
  const meta = await sharp(Buffer.from(e.data.data as string, 'base64')).metadata();
  expect(meta.format).toBe('webp');
  expect(Math.max(meta.width, meta.height)).toBe(128);
  expect({ width: meta.width, height: meta.height }).toEqual({ width: e.data.width, height: e.data.height });
}

describe('events from a test-engine worker through a second API instance', () => {
  let sys: Running;

  beforeAll(async () => {
    const config = await isolatedConfig({ EVENTS_HEARTBEAT_MS: String(HEARTBEAT_MS), PREVIEW_INTERVAL_MS: '500' });
    sys = await startProcesses(config, 2, testEngineArgs(STEP_MS));
  });

  afterAll(async () => {
    await Promise.allSettled((sys?.procs ?? []).map((p) => p.stop()));
  });

  it('SSE: in order, rising progress, previews, done with a working URL; a resume with Last-Event-ID loses nothing', async () => {
    const [a, b] = sys.apis as [string, string];
    const steps = 50;
    const id = await submit(a, { prompt: 'a red circle', num_steps: steps, width: 256, height: 192, seed: 7 });

    // Connect to the other instance, read until step 10, drop the connection.
    const first = await sse(`${b}/generated-images/${id}/events`);
    expect(first.status).toBe(200);
    expect(first.headers.get('cache-control')).toContain('no-cache');
    const part1 = await collect(first.events, (e) => e.event === 'progress' && (e.data.step as number) >= 10);
    first.close();
    const lastId = part1.filter((e) => e.id).at(-1)!.id!;

    // Resume there (as EventSource does on reconnect), to the end.
    const second = await sse(`${b}/generated-images/${id}/events`, { 'last-event-id': lastId });
    const part2 = await collect(second.events);
    expect(TERMINAL.has(part2.at(-1)!.event), 'the stream ends at the terminal event').toBe(true);
    expect(second.comments(), 'heartbeats while the job runs').toBeGreaterThan(0);

    const joined = [...part1, ...part2];
    await expectCompleteRun(
      joined.filter((e) => e.event !== 'queue'),
      steps,
    );

    // The whole log, replayed from the start by the first instance after the end, is exactly what the two parts had.
    const replay = await sse(`${a}/generated-images/${id}/events`);
    const all = await collect(replay.events);
    expect(joined.flatMap((e) => (e.id ? [e.id] : []))).toEqual(all.flatMap((e) => (e.id ? [e.id] : [])));

    const previews = joined.filter((e) => e.event === 'preview');
    expect(previews.length).toBeGreaterThanOrEqual(1);
    for (const p of previews) await expectPreview(p);
    // At most two a second, by the worker's clock.
    for (let i = 1; i < previews.length; i++) expect((previews[i]!.data.at as number) - (previews[i - 1]!.data.at as number)).toBeGreaterThanOrEqual(500);
    // A 2 s generation at one preview per 500 ms: more than one.
    expect(previews.length).toBeGreaterThanOrEqual(2);

    // Live progress reaches the client through the other instance promptly (the bench, npm run
    // bench:stream, measures it; this bounds it loosely enough for a loaded test machine).
    const connectedAt = part2[0]!.receivedAt;
    const latencies = part2.filter((e) => e.event === 'progress' && (e.data.at as number) > connectedAt).map((e) => e.receivedAt - (e.data.at as number));
    expect(latencies.length).toBeGreaterThan(10);
    expect(quantile(latencies, 0.5)).toBeLessThan(50);
  });

  it('SSE: queue position while waiting, then the run', async () => {
    const [a, b] = sys.apis as [string, string];
    // One worker, one job at a time: the third job waits behind two.
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(await submit(a, { prompt: 'a blue square', num_steps: 15, width: 64, height: 64 }));
    const conn = await sse(`${b}/generated-images/${ids[2]}/events`);
    const events = await collect(conn.events);
    const positions = events.filter((e) => e.event === 'queue').map((e) => e.data.jobs_ahead as number);
    expect(positions.length).toBeGreaterThanOrEqual(1);
    expect(positions[0]).toBeGreaterThanOrEqual(1);
    for (let i = 1; i < positions.length; i++) expect(positions[i]).toBeLessThan(positions[i - 1]!);
    expect(events.at(-1)!.event).toBe('done');
  });

  it('SSE: a finished job replays its events and ends; unknown jobs and bad ids are problems', async () => {
    const [a, b] = sys.apis as [string, string];
    const id = await submit(a, { prompt: 'a green circle', num_steps: 5, width: 64, height: 64 });
    await collect((await sse(`${a}/generated-images/${id}/events`)).events);
    const late = await collect((await sse(`${b}/generated-images/${id}/events`)).events);
    await expectCompleteRun(late, 5);

    const unknown = await sse(`${b}/generated-images/00000000-0000-4000-8000-000000000000/events`);
    expect(unknown.status).toBe(404);
    expect(unknown.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    // Another tenant's job answers as an unknown one; no key is a 401.
    const foreign = await openSse(`${b}/generated-images/${id}/events`, otherAuth, checkedFetch(checker!));
    expect(foreign.status).toBe(404);
    expect(JSON.stringify(foreign.errorBody).replaceAll(id, '<id>')).toBe(
      JSON.stringify((await openSse(`${b}/generated-images/00000000-0000-4000-8000-000000000000/events`, otherAuth)).errorBody).replaceAll(
        '00000000-0000-4000-8000-000000000000',
        '<id>',
      ),
    );
    expect((await openSse(`${b}/generated-images/${id}/events`)).status).toBe(401);
    const bad = await sse(`${b}/generated-images/${id}/events`, { 'last-event-id': 'x; DROP' });
    expect(bad.status).toBe(400);
    expect(bad.errorBody).toMatchObject({ errors: [{ field: 'Last-Event-ID', rule: 'format' }] });
  });

  it('SSE: a canceled job ends with canceled', async () => {
    const [a, b] = sys.apis as [string, string];
    const id = await submit(a, { prompt: 'a red square', num_steps: 100, width: 64, height: 64 });
    const conn = await sse(`${b}/generated-images/${id}/events`);
    const seen: SseEvent[] = [];
    for await (const e of conn.events) {
      seen.push(e);
      if (e.event === 'progress' && e.data.step === 3) await cfetch(`${a}/generated-images/${id}/cancel`, { method: 'POST' });
    }
    expect(seen.at(-1)).toMatchObject({ event: 'canceled', data: { status: 'canceled' } });
  });

  it('WebSocket: three jobs on one connection', async () => {
    const [a, b] = sys.apis as [string, string];
    const ids = await Promise.all([1, 2, 3].map((i) => submit(a, { prompt: 'a red circle', num_steps: 8 + i, width: 64, height: 64, seed: i })));
    // Another tenant's job, which this connection must not see.
    const foreignRes = await fetch(`${a}/generated-images`, {
      method: 'POST',
      headers: { ...otherAuth, 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'not yours', num_steps: 2, width: 64, height: 64 }),
    });
    const foreign = ((await foreignRes.json()) as { id: string }).id;
    // Without a key the upgrade itself is refused.
    const anonymous = new WebSocket(`${b.replace('http', 'ws')}/events`);
    const refused = await new Promise<number>((resolve) => anonymous.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0)));
    expect(refused).toBe(401);
    const ws = new WebSocket(`${b.replace('http', 'ws')}/events`, { headers: auth });
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    const byJob = new Map<string, Array<{ id?: string; event: string; data: Record<string, unknown> }>>();
    const errors: Array<Record<string, unknown>> = [];
    const ended = new Set<string>();
    const done = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${ended.size} of 3 jobs ended`)), 30_000);
      ws.on('message', (raw: Buffer) => {
        const msg = JSON.parse(raw.toString()) as Record<string, unknown> & { type: string; job_id: string };
        if (msg.type === 'event') byJob.set(msg.job_id, [...(byJob.get(msg.job_id) ?? []), msg as never]);
        if (msg.type === 'error') errors.push(msg);
        if (msg.type === 'end') ended.add(msg.job_id);
        if (ended.size === 3 && errors.length === 3) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    for (const id of ids) ws.send(JSON.stringify({ op: 'subscribe', id }));
    ws.send(JSON.stringify({ op: 'subscribe', id: '00000000-0000-4000-8000-000000000000' }));
    ws.send(JSON.stringify({ op: 'subscribe', id: foreign }));
    ws.send('not json');
    await done;
    ws.close();
    for (const [i, id] of ids.entries()) {
      const events = (byJob.get(id) ?? []).map((e) => ({ ...e, receivedAt: 0 }));
      await expectCompleteRun(
        events.filter((e) => e.event !== 'queue'),
        9 + i,
      );
    }
    expect(errors).toContainEqual(expect.objectContaining({ job_id: '00000000-0000-4000-8000-000000000000', status: 404 }));
    // The other tenant's job is an unknown id here, word for word.
    const foreignError = errors.find((e) => e.job_id === foreign)!;
    const unknownError = errors.find((e) => e.job_id === '00000000-0000-4000-8000-000000000000')!;
    expect(JSON.stringify(foreignError).replaceAll(foreign, '<id>')).toBe(
      JSON.stringify(unknownError).replaceAll('00000000-0000-4000-8000-000000000000', '<id>'),
    );
    expect(byJob.has(foreign)).toBe(false);
    expect(errors).toContainEqual(expect.objectContaining({ status: 400, errors: [expect.objectContaining({ rule: 'json' })] }));

    // A plain GET on the WebSocket route says what it is.
    const plain = await cfetch(`${b}/events`);
    expect(plain.status).toBe(426);
  });
});

describe('events of jobs that share a batch, one of them of several images', () => {
  let sys: Running;

  beforeAll(async () => {
    const config = await isolatedConfig({ PREVIEW_INTERVAL_MS: '500', BATCH_MAX: '3', BATCH_WAIT_MS: '3000' });
    sys = await startProcesses(config, 1, testEngineArgs(STEP_MS));
  });

  afterAll(async () => {
    await Promise.allSettled((sys?.procs ?? []).map((p) => p.stop()));
  });

  it("each job streams its own progress and previews; the job of two images counts both images' steps", async () => {
    const [a] = sys.apis as [string];
    const steps = 30;
    // Two images and one: a full batch of three generations (BATCH_MAX 3).
    const [several, single] = await Promise.all([
      submit(a, { prompt: 'a red circle', num_steps: steps, width: 64, height: 64, seed: 11, num_images: 2 }),
      submit(a, { prompt: 'a blue square', num_steps: steps, width: 64, height: 64, seed: 12 }),
    ]);
    const follow = async (id: string) => collect((await sse(`${a}/generated-images/${id}/events`)).events);
    const [ofSeveral, ofSingle] = await Promise.all([follow(several), follow(single)]);

    await expectCompleteRun(
      ofSingle.filter((e) => e.event !== 'queue'),
      steps,
    );
    // Its two images step together: one event per shared step, two steps each.
    const progress = ofSeveral.filter((e) => e.event === 'progress').map((e) => e.data);
    expect(progress.map((p) => p.step)).toEqual(Array.from({ length: steps }, (_, i) => 2 * (i + 1)));
    expect(progress.at(-1)).toMatchObject({ step: 2 * steps, total: 2 * steps, percent: 100, eta_ms: 0 });
    const done = ofSeveral.at(-1)!;
    expect(done.event).toBe('done');
    const images = done.data.images as Array<{ index: number; seed: number; url: string }>;
    expect(images.map((i) => [i.index, i.seed])).toEqual([
      [0, 11],
      [1, 12],
    ]);
    for (const image of images) expect((await fetch(image.url)).status).toBe(200);
    for (const events of [ofSeveral, ofSingle]) {
      const previews = events.filter((e) => e.event === 'preview');
      expect(previews.length).toBeGreaterThanOrEqual(1);
      for (const p of previews) await expectPreview(p);
    }
  });
});

describe('previews from the real engine (oracle model)', () => {
  let sys: Running;

  beforeAll(async () => {
    const config = await isolatedConfig({ PREVIEW_INTERVAL_MS: '500', MAX_PIXEL_STEPS: String(512 * 512 * 150) });
    sys = await startProcesses(config, 1, []);
  });

  afterAll(async () => {
    await Promise.allSettled((sys?.procs ?? []).map((p) => p.stop()));
  });

  it("sends the engine's latent preview as a 128 px WebP", async () => {
    const [a] = sys.apis as [string];
    const id = await submit(a, { prompt: 'a big red circle', num_steps: 150, width: 512, height: 512, scheduler: 'euler', seed: 3 });
    const events = await collect((await sse(`${a}/generated-images/${id}/events`)).events);
    expect(events.at(-1)!.event).toBe('done');
    const previews = events.filter((e) => e.event === 'preview');
    expect(previews.length).toBeGreaterThanOrEqual(1);
    for (const p of previews) await expectPreview(p);
  });
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    checker!.expectNoMismatch();
    expect([...checker!.seen.keys()]).toEqual(
      expect.arrayContaining([
        'GET /generated-images/{id}/events 200',
        'GET /generated-images/{id}/events 404',
        'GET /generated-images/{id}/events 400',
        'GET /events 426',
      ]),
    );
  });
});
