/**
 * A fleet of models, end to end with real processes: `t2i api` and one `t2i worker` per model,
 * each serving an oracle test model written by `t2i make-test-models --kind oracle` (SD 1.5,
 * SDXL-Turbo, 9-channel inpainting, and later LCM), on real Postgres, Redis and S3. Driven over
 * HTTP with fetch as a client would; every answer is checked against the OpenAPI document.
 *
 *  - each job runs on a worker of the model it names (job rows say which worker ran it), and its
 *    picture is that model's (the oracles draw what the prompt says, each in its own way);
 *  - a request that leaves parameters out gets its model's defaults (SDXL-Turbo: 1 step,
 *    guidance 0, Euler ancestral; SD 1.5: 50 steps, guidance 9, PNDM);
 *  - a model nobody serves is a 400 naming the served ones; one listed in KNOWN_MODELS is held
 *    (201, with `hold`) until a worker for it starts, which fills in its defaults and runs it;
 *  - image-to-image and inpainting uploads (multipart), and their validation, field by field.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { freePort } from '../../src/dev/services.js';
import { guidedTargetLatent, oracleImage } from '../../src/engine/testmodels/oracle-spec.js';
import { createTestKey } from '../support/accounts.js';
import { checkedFetch, responseChecker, type ResponseChecker } from '../support/openapi.js';
import { inpaintingStats, maxAbs, meanAbs } from '../support/pixels.js';
import { configEnv, spawnService, type LogLine, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

const SD = 'oracle';
const TURBO = 'oracle-sdxl-turbo';
const INPAINT = 'oracle-inpaint';
/** Known to the API (KNOWN_MODELS) but with no worker until a test starts one. */
const LCM = 'oracle-lcm';
const MAX_UPLOAD_BYTES = 300_000;

let config: Config;
let modelsDir: string;
const procs: ServiceProcess[] = [];
let api = '';
let db: pg.Client;
let checker: ResponseChecker;
let cfetch: typeof fetch;
const workers: Record<string, ServiceProcess> = {};

interface Job {
  id: string;
  status: string;
  model: string | null;
  num_steps: number | null;
  guidance_scale: number | null;
  width: number | null;
  height: number | null;
  scheduler: string | null;
  strength: number | null;
  inputs: { image: boolean; mask: boolean };
  hold?: { reason: string; message: string } | null;
  pixel_steps: number;
  error: { code: string; message: string } | null;
}

interface Problem {
  status: number;
  detail: string;
  errors?: Array<{ field: string; rule: string; message: string }>;
}

function startWorker(model: string): Promise<LogLine> {
  const proc = spawnService(
    `worker-${model}`,
    'worker',
    configEnv(config, { WORKER_ID: `worker-${model}`, MODEL_DIR: path.join(modelsDir, model), LOG_LEVEL: 'info' }),
  );
  procs.push(proc);
  workers[model] = proc;
  return proc.waitForLine((l) => l.msg === 'worker ready', 60_000).then(() => proc.waitForLine((l) => l.msg === 'model loaded'));
}

beforeAll(async () => {
  config = await isolatedConfig({ LOG_LEVEL: 'info', KNOWN_MODELS: LCM, MAX_UPLOAD_BYTES: String(MAX_UPLOAD_BYTES) });
  modelsDir = await mkdtemp(path.join(os.tmpdir(), 't2i-fleet-models-'));
  // The CLI a developer runs, as a process: oracle models of every variant, named after it.
  await promisify(execFile)(process.execPath, ['bin/t2i.js', 'make-test-models', modelsDir, '--kind', 'oracle', '--variant', 'all'], { timeout: 120_000 });
  const port = await freePort();
  const apiProc = spawnService('api', 'api', configEnv(config, { PORT: String(port) }));
  procs.push(apiProc);
  await Promise.all([apiProc.waitForLine((l) => l.msg === 'api listening'), startWorker(SD), startWorker(TURBO), startWorker(INPAINT)]);
  api = `http://127.0.0.1:${port}`;
  checker = responseChecker(await (await fetch(`${api}/openapi.json`)).json());
  const key = await createTestKey(config.DATABASE_URL, 'fleet-co');
  const checked = checkedFetch(checker);
  cfetch = (input, init) => checked(input, { ...init, headers: { ...key.auth, ...(init?.headers as Record<string, string>) } });
  db = new pg.Client({ connectionString: config.DATABASE_URL });
  await db.connect();
}, 180_000);

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.end();
  if (modelsDir) await rm(modelsDir, { recursive: true, force: true });
});

async function post(body: Record<string, unknown>): Promise<{ status: number; json: Job & Problem }> {
  const res = await cfetch(`${api}/generated-images`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as Job & Problem };
}

/** A multipart submission: the JSON request and the pictures, as `curl -F` sends them. */
async function postForm(request: Record<string, unknown> | string, files: Record<string, Buffer>): Promise<{ status: number; json: Job & Problem }> {
  const form = new FormData();
  form.append('request', typeof request === 'string' ? request : JSON.stringify(request));
  for (const [name, bytes] of Object.entries(files)) form.append(name, new Blob([new Uint8Array(bytes)], { type: 'image/png' }), `${name}.png`);
  const res = await cfetch(`${api}/generated-images`, { method: 'POST', body: form });
  return { status: res.status, json: (await res.json()) as Job & Problem };
}

async function waitForDone(id: string, timeoutMs = 60_000): Promise<Job> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = (await (await cfetch(`${api}/generated-images/${id}`)).json()) as Job;
    if (['succeeded', 'failed', 'canceled'].includes(job.status)) return job;
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function download(id: string): Promise<{ data: Buffer; width: number; height: number }> {
  const { url } = (await (await cfetch(`${api}/generated-images/${id}/url`)).json()) as { url: string };
  const png = Buffer.from(await (await fetch(url)).arrayBuffer());
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height };
}

async function workerOf(id: string): Promise<{ worker_id: string; model: string }> {
  const { rows } = await db.query<{ worker_id: string; model: string }>('SELECT worker_id, model FROM generated_images WHERE id = $1', [id]);
  return rows[0]!;
}

const png = (raw: Buffer, width: number, height: number) =>
  sharp(raw, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();

/** A picture of 8x8 blocks (the oracle VAE's round trip is exact for them): left half blue, right half green. */
function halves(w: number, h: number): Buffer {
  const raw = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) raw.set(x < w / 2 ? [0, 0, 255] : [0, 255, 0], (y * w + x) * 3);
  return raw;
}

describe('a fleet of models', () => {
  it('each worker announces its model and variant; GET /models reports them, and the known model without a worker', async () => {
    for (const [model, variant] of [
      [SD, /^SD 1\.x/],
      [TURBO, /^SDXL Turbo/],
      [INPAINT, /inpainting/],
    ] as const) {
      const loaded = await workers[model]!.waitForLine((l) => l.msg === 'model loaded');
      expect(loaded).toMatchObject({ model, queue: `${config.QUEUE_NAME}.${model}` });
      expect(String(loaded.variant)).toMatch(variant);
    }
    const res = (await (await cfetch(`${api}/models`)).json()) as {
      models: Array<{ id: string; status: string; variant: string | null; workers: number; tasks: string[]; model_defaults: Record<string, unknown> | null }>;
      request_defaults: unknown;
    };
    const byId = new Map(res.models.map((m) => [m.id, m]));
    expect([...byId.keys()].sort()).toEqual([INPAINT, LCM, SD, TURBO].sort());
    expect(byId.get(TURBO)).toMatchObject({
      status: 'serving',
      workers: 1,
      variant: expect.stringMatching(/^SDXL Turbo/) as unknown,
      tasks: ['text-to-image', 'image-to-image'],
      model_defaults: { num_steps: 1, guidance_scale: 0, width: 512, height: 512, scheduler: 'euler_ancestral', strength: 0.3 },
    });
    expect(byId.get(SD)).toMatchObject({
      status: 'serving',
      tasks: ['text-to-image', 'image-to-image', 'inpainting'],
      model_defaults: { num_steps: 50, guidance_scale: 9 },
    });
    expect(byId.get(INPAINT)).toMatchObject({ status: 'serving', tasks: ['inpainting'] });
    expect(byId.get(LCM)).toMatchObject({ status: 'no_worker', workers: 0, variant: null, model_defaults: null });
    // Several models and no DEFAULT_MODEL: there is no default for a request that names none.
    expect(res.request_defaults).toBeNull();
  });

  it("runs each job on a worker of the model it names, with that model's defaults and picture", async () => {
    const turbo = await post({ prompt: 'a red circle on the left', model: TURBO, seed: 5 });
    const sd = await post({ prompt: 'a blue square on the right', model: SD, seed: 5, num_steps: 20, width: 128, height: 128 });
    expect([turbo.status, sd.status]).toEqual([201, 201]);
    // Left out: the model's own defaults, filled in when the job was created.
    expect(turbo.json).toMatchObject({ model: TURBO, num_steps: 1, guidance_scale: 0, width: 512, height: 512, scheduler: 'euler_ancestral', hold: null });
    expect(turbo.json.pixel_steps).toBe(512 * 512 * 1);
    expect(sd.json).toMatchObject({ model: SD, num_steps: 20, guidance_scale: 9, width: 128, height: 128, scheduler: 'pndm' });

    const [doneTurbo, doneSd] = await Promise.all([waitForDone(turbo.json.id), waitForDone(sd.json.id)]);
    expect([doneTurbo.status, doneSd.status], JSON.stringify([doneTurbo.error, doneSd.error])).toEqual(['succeeded', 'succeeded']);
    expect(await workerOf(turbo.json.id)).toEqual({ worker_id: `worker-${TURBO}`, model: TURBO });
    expect(await workerOf(sd.json.id)).toEqual({ worker_id: `worker-${SD}`, model: SD });

    // SDXL-Turbo's oracle, unguided at one trailing step, lands on the prompt's target.
    const t = await download(turbo.json.id);
    expect([t.width, t.height]).toEqual([512, 512]);
    expect(meanAbs(t.data, oracleImage(guidedTargetLatent('a red circle on the left', '', 0, 64, 64), 64, 64))).toBeLessThan(1);
    const s = await download(sd.json.id);
    // PNDM leaves a little noise by design.
    expect(meanAbs(s.data, oracleImage(guidedTargetLatent('a blue square on the right', '', 9, 16, 16), 16, 16))).toBeLessThan(4);
  });

  it('refuses a model nobody serves with a 400 listing the models that are served (and the known one)', async () => {
    const res = await post({ prompt: 'a green dot', model: 'sd-9000' });
    expect(res.status).toBe(400);
    expect(res.json.errors).toEqual([{ field: 'model', rule: 'not_served', message: expect.any(String) as unknown }]);
    const message = res.json.errors![0]!.message;
    for (const served of [SD, TURBO, INPAINT]) expect(message).toContain(served);
    expect(message).toMatch(new RegExp(`known \\(jobs wait for a worker\\): ${LCM}`));
    // No model named and several served, no DEFAULT_MODEL: the client must choose.
    const none = await post({ prompt: 'a green dot' });
    expect(none.status).toBe(400);
    expect(none.json.errors).toEqual([{ field: 'model', rule: 'required', message: expect.stringContaining(TURBO) as unknown }]);
  });

  it('holds a job for a known model with no worker, then its first worker fills in its defaults and runs it', async () => {
    const held = await post({ prompt: 'a yellow circle', model: LCM, seed: 3, width: 128, height: 128 });
    expect(held.status).toBe(201);
    // Never served: no defaults yet (its worker fills them in); charged as 50 steps meanwhile.
    expect(held.json).toMatchObject({ status: 'queued', model: LCM, num_steps: null, guidance_scale: null, scheduler: null, width: 128, height: 128 });
    expect(held.json.hold).toEqual({ reason: 'no_worker', message: expect.stringContaining(LCM) as unknown });
    expect(held.json.pixel_steps).toBe(128 * 128 * 50);
    const polled = (await (await cfetch(`${api}/generated-images/${held.json.id}`)).json()) as Job;
    expect(polled.hold?.reason).toBe('no_worker');

    await startWorker(LCM);
    const done = await waitForDone(held.json.id);
    expect(done.error).toBeNull();
    // The LCM model's own defaults, and the charge corrected to them.
    expect(done).toMatchObject({ status: 'succeeded', num_steps: 4, guidance_scale: 8.5, scheduler: 'lcm', hold: null });
    expect(done.pixel_steps).toBe(128 * 128 * 4);
    expect(await workerOf(held.json.id)).toEqual({ worker_id: `worker-${LCM}`, model: LCM });
  });
});

describe('image-to-image and inpainting through the API', () => {
  it('image-to-image at strength 0 returns the uploaded picture; the output takes its size, and strength defaults to the model’s', async () => {
    const input = halves(96, 64);
    const res = await postForm({ prompt: 'a red circle', model: SD, strength: 0, seed: 1, num_steps: 10 }, { image: await png(input, 96, 64) });
    expect(res.status, JSON.stringify(res.json)).toBe(201);
    expect(res.json).toMatchObject({ width: 96, height: 64, strength: 0, inputs: { image: true, mask: false } });
    const done = await waitForDone(res.json.id);
    expect(done.status, JSON.stringify(done.error)).toBe('succeeded');
    const out = await download(res.json.id);
    expect([out.width, out.height]).toEqual([96, 64]);
    expect(maxAbs(out.data, input)).toBeLessThanOrEqual(1);

    // SDXL-Turbo's strength is 0.3: of 4 steps it runs int(4 x 0.3) = 1.
    const defaulted = await postForm({ prompt: 'a red circle', model: TURBO, num_steps: 4 }, { image: await png(halves(64, 64), 64, 64) });
    expect(defaulted.status).toBe(201);
    expect(defaulted.json.strength).toBe(0.3);
    expect((await waitForDone(defaulted.json.id)).status).toBe('succeeded');
    // Of 2 it would run none: only the model can tell, so the job fails saying why, not retried.
    const none = await postForm({ prompt: 'a red circle', model: TURBO, num_steps: 2 }, { image: await png(halves(64, 64), 64, 64) });
    const failed = await waitForDone(none.json.id);
    expect(failed).toMatchObject({ status: 'failed', error: { code: 'invalid_for_model' } });
    expect(failed.error!.message).toMatch(/`strength` 0\.3 with `num_steps` 2 leaves no denoising step to run/);
  });

  it('inpainting on the 9-channel model paints inside the mask and keeps the picture outside it', async () => {
    const W = 128;
    const input = halves(W, W);
    const mask = Buffer.alloc(W * W * 3);
    const inMask = (x: number, y: number) => x >= 40 && x < 88 && y >= 40 && y < 88;
    for (let y = 0; y < W; y++) for (let x = 0; x < W; x++) if (inMask(x, y)) mask.set([255, 255, 255], (y * W + x) * 3);
    const res = await postForm(
      { prompt: 'red', model: INPAINT, seed: 9, num_steps: 20, scheduler: 'euler', guidance_scale: 7.5 },
      {
        image: await png(input, W, W),
        mask: await png(mask, W, W),
      },
    );
    expect(res.status, JSON.stringify(res.json)).toBe(201);
    expect(res.json).toMatchObject({ inputs: { image: true, mask: true }, strength: null });
    const done = await waitForDone(res.json.id);
    expect(done.status, JSON.stringify(done.error)).toBe('succeeded');
    expect(await workerOf(res.json.id)).toEqual({ worker_id: `worker-${INPAINT}`, model: INPAINT });
    const out = await download(res.json.id);
    const stats = inpaintingStats(out.data, input, W, W, inMask, ([r, g, b]) => r > 240 && g < 15 && b < 15);
    expect(stats.keptMeanAbs).toBeLessThan(0.01);
    expect(stats.paintedShare).toBeGreaterThan(0.999);
    // The inputs are stored under the tenant and the job, and removed with the job.
    const { rows } = await db.query<{ image_key: string; mask_key: string; tenant_id: string }>(
      'SELECT image_key, mask_key, tenant_id FROM generated_images WHERE id = $1',
      [res.json.id],
    );
    expect(rows[0]!.image_key).toBe(`inputs/${rows[0]!.tenant_id}/${res.json.id}/image`);
    expect(rows[0]!.mask_key).toBe(`inputs/${rows[0]!.tenant_id}/${res.json.id}/mask`);
  });

  it('names the field and the rule of every bad upload, with a 400 (or a 413 for a file too large)', async () => {
    const pic = await png(halves(64, 64), 64, 64);
    const other = await png(halves(128, 64), 128, 64);
    const cases: Array<[string, () => Promise<{ status: number; json: Problem }>, number, Array<[string, string]>]> = [
      ['not a picture', () => postForm({ prompt: 'x', model: SD }, { image: Buffer.from('GIF89a not really a picture') }), 400, [['image', 'format']]],
      ['a PNG cut short', () => postForm({ prompt: 'x', model: SD }, { image: pic.subarray(0, 60) }), 400, [['image', 'decode']]],
      [
        'a picture whose size is not the request’s',
        () => postForm({ prompt: 'x', model: SD, width: 128, height: 128 }, { image: pic }),
        400,
        [['image', 'size']],
      ],
      [
        'a picture whose sides are not multiples of 8',
        async () => postForm({ prompt: 'x', model: SD }, { image: await png(Buffer.alloc(60 * 64 * 3), 60, 64) }),
        400,
        [['image', 'dimensions']],
      ],
      ['a mask the size of another picture', () => postForm({ prompt: 'x', model: SD }, { image: pic, mask: other }), 400, [['mask', 'size']]],
      ['a mask without a picture', () => postForm({ prompt: 'x', model: SD }, { mask: pic }), 400, [['mask', 'requires_image']]],
      ['strength without a picture', () => post({ prompt: 'x', model: SD, strength: 0.5 }), 400, [['strength', 'requires_image']]],
      ['strength out of range', () => postForm({ prompt: 'x', model: SD, strength: 1.5 }, { image: pic }), 400, [['strength', 'max']]],
      [
        'a mask for a model without inpainting (SDXL)',
        () => postForm({ prompt: 'x', model: TURBO }, { image: pic, mask: pic }),
        400,
        [['mask', 'not_supported']],
      ],
      ['a picture without a mask for an inpainting model', () => postForm({ prompt: 'x', model: INPAINT }, { image: pic }), 400, [['mask', 'required']]],
      [
        'strength for a 9-channel inpainting model',
        () => postForm({ prompt: 'x', model: INPAINT, strength: 0.5 }, { image: pic, mask: pic }),
        400,
        [['strength', 'not_supported']],
      ],
      ['several images from one picture', () => postForm({ prompt: 'x', model: SD, num_images: 2 }, { image: pic }), 400, [['num_images', 'max']]],
      ['a request part that is not JSON', () => postForm('{"prompt": ', { image: pic }), 400, [['request', 'json']]],
      ['an unknown field in the request', () => postForm({ prompt: 'x', model: SD, colour: 'red' }, { image: pic }), 400, [['colour', 'unknown_field']]],
      ['an unknown file part', () => postForm({ prompt: 'x', model: SD }, { picture: pic }), 400, [['picture', 'unknown_field']]],
      [
        'a file over MAX_UPLOAD_BYTES',
        () => postForm({ prompt: 'x', model: SD }, { image: Buffer.alloc(MAX_UPLOAD_BYTES + 1, 1) }),
        413,
        [['image', 'max_bytes']],
      ],
    ];
    for (const [name, send, status, fields] of cases) {
      const res = await send();
      expect(res.status, `${name}: ${JSON.stringify(res.json)}`).toBe(status);
      expect(
        res.json.errors?.map((e) => [e.field, e.rule]),
        name,
      ).toEqual(fields);
      expect(res.json.detail, name).toEqual(expect.any(String));
    }
    // Every problem of one request in one answer.
    const many = await postForm({ prompt: '', model: SD, strength: 2 }, { image: Buffer.from('nope'), mask: other });
    expect(many.status).toBe(400);
    expect(new Set(many.json.errors!.map((e) => `${e.field}:${e.rule}`))).toEqual(new Set(['prompt:non_empty', 'strength:max', 'image:format']));
  });
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    checker.expectNoMismatch();
    expect([...checker.seen.keys()]).toEqual(
      expect.arrayContaining(['POST /generated-images 201', 'POST /generated-images 400', 'POST /generated-images 413', 'GET /models 200']),
    );
  });
});
