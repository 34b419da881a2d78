/**
 * The OpenAI-compatible API with the official `openai` npm client pointed at real processes
 * (`t2i api`, `t2i worker --test-engine`) on real Postgres, Redis and S3; and the discovery
 * routes the same fleet answers.
 */
import OpenAI from 'openai';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { freePort } from '../../src/dev/services.js';
import { configEnv, spawnService, testEngineArgs, type ServiceProcess } from '../support/processes.js';
import { checkedFetch, responseChecker, type ResponseChecker } from '../support/openapi.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

let config: Config;
const procs: ServiceProcess[] = [];
let api = '';
let client: OpenAI;
/** Every answer these tests get is checked against the API's OpenAPI document. */
let checker: ResponseChecker;
let cfetch: typeof fetch;

beforeAll(async () => {
  config = await isolatedConfig({ LOG_LEVEL: 'info' });
  const port = await freePort();
  procs.push(spawnService('api', 'api', configEnv(config, { PORT: String(port) })));
  procs.push(spawnService('worker', 'worker', configEnv(config, { WORKER_ID: 'openai-worker' }), testEngineArgs(5)));
  await Promise.all([procs[0]!.waitForLine((l) => l.msg === 'api listening'), procs[1]!.waitForLine((l) => l.msg === 'worker ready')]);
  api = `http://127.0.0.1:${port}`;
  checker = responseChecker(await (await fetch(`${api}/openapi.json`)).json());
  const key = await createTestKey(config.DATABASE_URL, 'openai-co');
  const checked = checkedFetch(checker);
  cfetch = (input, init) => checked(input, { ...init, headers: { ...key.auth, ...(init?.headers as Record<string, string>) } });
  // The same API keys as the native API, sent as OpenAI clients send theirs.
  client = new OpenAI({ apiKey: key.key, baseURL: `${api}/v1`, maxRetries: 0, fetch: checked });
});

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
});

/** The test engine paints an image in its seed's colour (low, middle and high bytes as R, G, B). */
async function colourOf(png: Buffer): Promise<[number, number, number]> {
  const { data } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  // Pixel 1: pixel 0 is random on purpose (every generation's bytes its own).
  return [data[3]!, data[4]!, data[5]!];
}

/** The non-streaming answer (these calls never stream). */
async function generate(params: Record<string, unknown>): Promise<OpenAI.ImagesResponse> {
  return client.images.generate(params as unknown as OpenAI.ImageGenerateParamsNonStreaming);
}

// Parameters the native API has and OpenAI's does not: the client passes unknown fields through.
const fast = { num_steps: 3 } as Record<string, unknown>;

describe('the openai client', () => {
  it('images.generate with url, n = 2: two different images at working URLs, seeds seed and seed + 1', async () => {
    const res = await generate({ prompt: 'a red circle', n: 2, size: '64x64', response_format: 'url', ...fast, seed: 0x010203 });
    expect(res.created).toBeGreaterThan(1_700_000_000);
    expect(res.data).toHaveLength(2);
    const pngs = await Promise.all(
      res.data!.map(async (d) => {
        const r = await fetch(d.url!);
        expect(r.status).toBe(200);
        return Buffer.from(await r.arrayBuffer());
      }),
    );
    expect(await colourOf(pngs[0]!)).toEqual([0x03, 0x02, 0x01]);
    expect(await colourOf(pngs[1]!)).toEqual([0x04, 0x02, 0x01]);
  });

  it('images.generate with b64_json, n = 2', async () => {
    const res = await generate({ prompt: 'a blue square', n: 2, response_format: 'b64_json', size: '64x64', ...fast, seed: 7 });
    expect(res.data).toHaveLength(2);
    const pngs = res.data!.map((d) => Buffer.from(d.b64_json!, 'base64'));
    for (const png of pngs) expect((await sharp(png).metadata()).format).toBe('png');
    expect(await colourOf(pngs[0]!)).toEqual([7, 0, 0]);
    expect(await colourOf(pngs[1]!)).toEqual([8, 0, 0]);
    expect(res.data!.every((d) => d.url === undefined)).toBe(true);
  });

  it('fields without meaning here are accepted and ignored; OpenAI model names mean the fleet model', async () => {
    const res = await generate({
      prompt: 'a green circle',
      model: 'dall-e-3',
      quality: 'hd',
      style: 'vivid',
      user: 'user-1234',
      size: '64x64',
      ...fast,
    });
    expect(res.data).toHaveLength(1);
    // The job is a job like any other.
    const job = (await (await cfetch(`${api}/generated-images?limit=1`)).json()) as { items: Array<{ prompt: string; status: string }> };
    expect(job.items[0]).toMatchObject({ prompt: 'a green circle', status: 'succeeded' });
  });

  it('errors come in OpenAI shape, as the client reads them', async () => {
    const bad = await generate({ prompt: 'x', size: '100x100' }).catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
    const e = bad as InstanceType<typeof OpenAI.BadRequestError>;
    expect(e.status).toBe(400);
    expect(e.type).toBe('invalid_request_error');
    expect(e.param).toBe('size');
    expect(e.message).toMatch(/multiple of 8/);

    const many = (await generate({ prompt: 'x', n: 5 }).catch((x: unknown) => x)) as InstanceType<typeof OpenAI.BadRequestError>;
    expect(many.status).toBe(400);
    expect(many.param).toBe('n');

    const model = (await generate({ prompt: 'x', model: 'no-such-model' }).catch((x: unknown) => x)) as InstanceType<typeof OpenAI.NotFoundError>;
    expect(model).toBeInstanceOf(OpenAI.NotFoundError);
    expect(model.code).toBe('model_not_found');

    const empty = (await generate({ prompt: '' }).catch((x: unknown) => x)) as InstanceType<typeof OpenAI.BadRequestError>;
    expect(empty.param).toBe('prompt');

    const failed = (await generate({ prompt: 'x [test:oom]', size: '64x64', ...fast }).catch((x: unknown) => x)) as InstanceType<typeof OpenAI.BadRequestError>;
    expect(failed.status).toBe(400);
    expect(failed.code).toBe('out_of_memory');
    expect(failed.headers?.get('x-t2i-job-id')).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('needs an API key: a wrong one is a 401 in OpenAI shape', async () => {
    const anonymous = new OpenAI({ apiKey: 'sk-not-a-t2i-key', baseURL: `${api}/v1`, maxRetries: 0, fetch: checkedFetch(checker) });
    const err = (await anonymous.models.list().catch((e: unknown) => e)) as InstanceType<typeof OpenAI.AuthenticationError>;
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect(err.code).toBe('invalid_api_key');
  });

  it('models.list names what the fleet serves', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['test-engine']);
    expect(models.data[0]).toMatchObject({ object: 'model', owned_by: 't2i' });
    expect((await client.models.retrieve('test-engine')).id).toBe('test-engine');
  });
});

describe('discovery', () => {
  it('GET /models and GET /schedulers list the fleet, with defaults and limits', async () => {
    const models = (await (await cfetch(`${api}/models`)).json()) as Record<string, unknown> & { models: Array<Record<string, unknown>> };
    expect(models.models).toEqual([
      expect.objectContaining({ id: 'test-engine', workers: 1, providers: ['none'], model_defaults: expect.objectContaining({ num_steps: 50 }) as unknown }),
    ]);
    expect(models.limits).toMatchObject({ max_steps: 150, max_images: 4, max_pixel_steps: config.MAX_PIXEL_STEPS });
    const schedulers = (await (await cfetch(`${api}/schedulers`)).json()) as { schedulers: Array<{ name: string; models: string[] }>; default: string };
    expect(schedulers.schedulers.map((s) => s.name)).toEqual(['pndm', 'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m', 'lcm']);
    expect(schedulers.schedulers[0]!.models).toEqual(['test-engine']);
    expect(schedulers.default).toBe('pndm');
  });
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    checker.expectNoMismatch();
    expect([...checker.seen.keys()]).toEqual(
      expect.arrayContaining([
        'POST /v1/images/generations 200',
        'POST /v1/images/generations 400',
        'POST /v1/images/generations 404',
        'GET /v1/models 200',
        'GET /models 200',
      ]),
    );
  });
});
