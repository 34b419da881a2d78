import fc from 'fast-check';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import request from 'supertest';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import { createProducer, type ProducerQueue } from '../../src/adapters/queue.js';
import { createStorage } from '../../src/adapters/storage.js';
import { buildApp } from '../../src/api/app.js';
import type { Config } from '../../src/config.js';
import { AccountsService } from '../../src/core/accounts.js';
import { ImagesService } from '../../src/core/images.js';
import { queueSettings, storageOptions } from '../../src/core/wiring.js';
import { hostileBodies } from '../support/fuzz.js';
import { createTestKey } from '../support/accounts.js';
import { testFleet } from '../support/fleet.js';
import { isolatedConfig } from '../support/system.js';

/**
 * What a prompt may contain, and input Postgres or JavaScript cannot hold, against the real API
 * over real Postgres and Redis: every such body is a 400 that names the field and the rule, never
 * a 500, and what was accepted is stored exactly as sent.
 */

let config: Config;
let db: Db;
let producer: ProducerQueue;
let app: FastifyInstance;
let auth: { authorization: string };
let fleet: Awaited<ReturnType<typeof testFleet>>;

beforeAll(async () => {
  config = await isolatedConfig();
  ({ auth } = await createTestKey(config.DATABASE_URL));
  db = createPrismaClient(config.DATABASE_URL);
  producer = createProducer(config.REDIS_URL, queueSettings(config));
  const storage = createStorage(storageOptions(config));
  const logger = pino({ level: 'silent' });
  fleet = await testFleet(config);
  app = buildApp({
    images: new ImagesService({
      repo: createImagesRepo(db),
      queue: producer,
      storage,
      models: fleet.catalog,
      maxPixelSteps: config.MAX_PIXEL_STEPS,
      log: logger,
    }),
    accounts: new AccountsService(createAccountsRepo(db)),
    logger,
    bodyLimit: config.BODY_LIMIT_BYTES,
  });
  await app.ready();
});

afterAll(async () => {
  await app?.close();
  await fleet?.close();
  await producer?.close();
  await db?.$disconnect();
});

const post = (body: string) => request(app.server).post('/generated-images').set(auth).set('content-type', 'application/json').send(body);

interface Problem {
  status: number;
  title: string;
  detail: string;
  errors?: Array<{ field: string; rule: string; message: string }>;
}

async function expect400(body: unknown, field: string, rule: string): Promise<Problem> {
  const res = await post(JSON.stringify(body));
  expect(res.status, JSON.stringify(res.body)).toBe(400);
  expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
  const problem = res.body as Problem;
  expect(problem.errors).toContainEqual(expect.objectContaining({ field, rule }));
  return problem;
}

describe('what a prompt may contain', () => {
  it.each([
    ['NUL, which Postgres text cannot hold', 'a red\u0000 circle', 'no_control_characters'],
    ['an escape sequence', 'a \u001b[31mred\u001b[0m circle', 'no_control_characters'],
    ['a C1 control character', 'a red\u0085circle', 'no_control_characters'],
    ['DEL', 'a red\u007fcircle', 'no_control_characters'],
    ['a lone high surrogate', 'a red \ud83d circle', 'unicode'],
    ['a lone low surrogate', '\ude00 a red circle', 'unicode'],
  ])('refuses %s with a 400 naming the field and the rule', async (_what, prompt, rule) => {
    await expect400({ prompt }, 'prompt', rule);
    await expect400({ prompt: 'a red circle', negative_prompt: prompt }, 'negative_prompt', rule);
  });

  it('accepts any other Unicode and stores it exactly: tabs and newlines, emoji, combining marks, right-to-left text, noncharacters', async () => {
    const prompt = 'a red\tcircle\non the left\r\n😀 e\u0301 \u05d0\u05d1 \u202e \ufffe\uffff 𝕏';
    const res = await post(JSON.stringify({ prompt, num_steps: 1 }));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const row = await db.generatedImage.findUnique({ where: { id: (res.body as { id: string }).id } });
    expect(row?.prompt).toBe(prompt);
  });

  it('counts the length in characters (code points), not UTF-16 units: 2000 emoji are allowed, 2001 are not', async () => {
    expect((await post(JSON.stringify({ prompt: '😀'.repeat(2000), num_steps: 1 }))).status).toBe(201);
    await expect400({ prompt: '😀'.repeat(2001) }, 'prompt', 'max');
  });
});

describe('numbers and shapes JavaScript or Postgres cannot hold', () => {
  it.each([
    ['1e400 (Infinity once parsed)', '{"prompt":"x","num_steps":1e400}', 'num_steps'],
    ['-1e400', '{"prompt":"x","guidance_scale":-1e400}', 'guidance_scale'],
    ['a 40-digit seed', '{"prompt":"x","seed":1234567890123456789012345678901234567890}', 'seed'],
    ['a seed past 2^32 - 1', '{"prompt":"x","seed":4294967296}', 'seed'],
    ['an integer past 2^53 written exactly', '{"prompt":"x","width":9007199254740993}', 'width'],
  ])('%s is a 400 naming the field', async (_what, body, field) => {
    const res = await post(body);
    expect(res.status, JSON.stringify(res.body)).toBe(400);
    expect((res.body as Problem).errors?.map((e) => e.field)).toContain(field);
  });

  it.each([10, 1_000, 20_000])('a body nested %i levels deep is a 400, not a 500 or a hang', async (depth) => {
    const res = await post(`${'['.repeat(depth)}1${']'.repeat(depth)}`);
    expect(res.status).toBe(400);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
  });

  it('a request past the compute budget (width × height × num_steps) is a 400 that names the limit', async () => {
    const problem = await expect400({ prompt: 'x', width: 2048, height: 2048, num_steps: 150 }, '(body)', 'max_pixel_steps');
    expect(problem.detail).toContain('629,145,600');
    expect(problem.detail).toContain(config.MAX_PIXEL_STEPS.toLocaleString('en-US'));
    expect((await post(JSON.stringify({ prompt: 'x', width: 1024, height: 1024, num_steps: 50 }))).status).toBe(201);
  });
});

describe('property: bodies over a wide alphabet never make a 5xx', () => {
  const valid = { prompt: 'a red circle', negative_prompt: 'blue', num_steps: 2, guidance_scale: 7.5, seed: 1, width: 64, height: 64, scheduler: 'euler' };

  it('every answer is a 201 whose stored prompt equals the one sent, or a problem+json 4xx with a detail', async () => {
    const statuses = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(hostileBodies(valid), async (body) => {
        const res = await post(body);
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        expect(res.status, body.slice(0, 200)).toBeLessThan(500);
        if (res.status === 201) {
          const sent = JSON.parse(body) as { prompt: string };
          const row = await db.generatedImage.findUnique({ where: { id: (res.body as { id: string }).id } });
          expect(row?.prompt).toBe(sent.prompt);
        } else {
          expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
          expect((res.body as Problem).detail).toEqual(expect.any(String));
        }
      }),
      { numRuns: 400 },
    );
    // The generator reached both sides of the contract.
    expect(statuses.get(201) ?? 0).toBeGreaterThan(0);
    expect(statuses.get(400) ?? 0).toBeGreaterThan(0);
  }, 180_000);
});
