/**
 * Deletion and retention (issue 11, test 6), with real API and worker processes, Postgres and
 * S3: a deleted job and an expired one (finished more than RETENTION_DAYS ago, removed by the
 * worker's sweeper) leave no object in the bucket, their presigned URLs stop working, the API no
 * longer shows them, and their rows stay only as tombstones without prompts (still counted in
 * usage). Deleting a running job stops it without an object left behind; a deletion whose
 * object outlived it (storage down at the time) is finished by the sweeper.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createStorage, type ImageStorage } from '../../src/adapters/storage.js';
import type { Config } from '../../src/config.js';
import { storageOptions } from '../../src/core/wiring.js';
import { createTestKey, type TestKey } from '../support/accounts.js';
import { startApiProcess, startWorkerProcess, type ServiceProcess } from '../support/processes.js';
import { isolatedConfig } from '../support/system.js';

let config: Config;
let db: Db;
let storage: ImageStorage;
let url: string;
let key: TestKey;
const procs: ServiceProcess[] = [];

beforeAll(async () => {
  config = await isolatedConfig({ RETENTION_DAYS: '1', SWEEP_INTERVAL_MS: '1000' });
  db = createPrismaClient(config.DATABASE_URL);
  storage = createStorage(storageOptions(config));
  key = await createTestKey(config.DATABASE_URL, 'retention-co');
  const api = await startApiProcess(config);
  procs.push(api.proc);
  url = api.url;
  procs.push(await startWorkerProcess(config, 'retention-worker', 50));
}, 60_000);

afterAll(async () => {
  await Promise.allSettled(procs.map((p) => p.stop()));
  await db?.$disconnect();
});

const api = (method: string, path: string, body?: object) =>
  fetch(`${url}${path}`, {
    method,
    headers: { ...key.auth, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function finishedJob(prompt: string): Promise<{ id: string; url: string }> {
  const res = await api('POST', '/generated-images', { prompt, negative_prompt: `not ${prompt}`, num_steps: 2, width: 64, height: 64 });
  expect(res.status).toBe(201);
  const { id } = (await res.json()) as { id: string };
  await until(`${id} to succeed`, 30_000, async () => ((await db.generatedImage.findUnique({ where: { id } }))?.status === 'succeeded' ? true : undefined));
  const link = (await (await api('GET', `/generated-images/${id}/url`)).json()) as { url: string; expires_at: string };
  // Presigned URLs live PRESIGN_TTL_SECONDS: 1 hour unless configured otherwise.
  expect(Math.abs(Date.parse(link.expires_at) - (Date.now() + 3600_000))).toBeLessThan(60_000);
  expect((await fetch(link.url)).status).toBe(200);
  return { id, url: link.url };
}

/** Gone for everyone: no object under the job's prefix, its URL refused, the API says 404, the row a tombstone. */
async function expectGone(id: string, link: string, prompt: string): Promise<void> {
  expect(await storage.list(`images/${id}/`)).toEqual([]);
  const download = await fetch(link);
  await download.arrayBuffer();
  expect(download.status).toBe(404);
  expect((await api('GET', `/generated-images/${id}`)).status).toBe(404);
  expect((await api('GET', `/generated-images/${id}/url`)).status).toBe(404);
  const list = (await (await api('GET', '/generated-images?limit=100')).json()) as { items: Array<{ id: string }> };
  expect(list.items.map((i) => i.id)).not.toContain(id);
  const row = await db.generatedImage.findUniqueOrThrow({ where: { id } });
  expect(row).toMatchObject({ prompt: '', negativePrompt: null, fileName: null, tenantId: expect.any(String) as unknown });
  expect(row.deletedAt).toBeInstanceOf(Date);
  // What accounting needs stays: size, steps, the charge, the times.
  expect(Number(row.pixelSteps)).toBe(64 * 64 * 2);
  expect(JSON.stringify(row, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v))).not.toContain(prompt);
}

describe('deleting and expiring images', () => {
  it('DELETE removes the objects and the prompts at once; the URL stops working; the job still counts in usage', async () => {
    const prompt = 'delete me now';
    const job = await finishedJob(prompt);
    const before = (await (await api('GET', '/usage')).json()) as { pixel_steps: { used: number }; jobs_today: number };
    const del = await api('DELETE', `/generated-images/${job.id}`);
    expect(del.status).toBe(204);
    expect(await del.text()).toBe('');
    await expectGone(job.id, job.url, prompt);
    expect((await api('DELETE', `/generated-images/${job.id}`)).status).toBe(404);
    expect(await (await api('GET', '/usage')).json()).toMatchObject({ pixel_steps: { used: before.pixel_steps.used }, jobs_today: before.jobs_today });
  });

  it(`the sweeper deletes jobs finished more than RETENTION_DAYS ago, and leaves younger ones`, async () => {
    const old = await finishedJob('an old picture');
    const young = await finishedJob('a young picture');
    // Two days pass for the old one.
    await db.$executeRaw`UPDATE generated_images SET finished_at = now() - interval '2 days' WHERE id = ${old.id}::uuid`;
    await until('the sweeper to remove the old job', 15_000, async () =>
      (await db.generatedImage.findUniqueOrThrow({ where: { id: old.id } })).deletedAt && (await storage.list(`images/${old.id}/`)).length === 0
        ? true
        : undefined,
    );
    await expectGone(old.id, old.url, 'an old picture');
    // The young one is untouched, and its URL still works.
    expect((await api('GET', `/generated-images/${young.id}`)).status).toBe(200);
    expect((await fetch(young.url)).status).toBe(200);
    expect(await storage.list(`images/${young.id}/`)).toHaveLength(1);
  });

  it('deleting a running job stops it, and no object is left when it ends', async () => {
    const res = await api('POST', '/generated-images', { prompt: 'stop and forget me', num_steps: 60, width: 64, height: 64 });
    const { id } = (await res.json()) as { id: string };
    await until('the job to run', 30_000, async () => ((await db.generatedImage.findUnique({ where: { id } }))?.status === 'running' ? true : undefined));
    expect((await api('DELETE', `/generated-images/${id}`)).status).toBe(204);
    expect((await api('GET', `/generated-images/${id}`)).status).toBe(404);
    const row = await until('the worker to stop it', 30_000, async () => {
      const r = await db.generatedImage.findUniqueOrThrow({ where: { id } });
      return r.status === 'running' ? undefined : r;
    });
    expect(row).toMatchObject({ status: 'canceled', prompt: '', fileName: null });
    expect(await storage.list(`images/${id}/`)).toEqual([]);
  });

  it('finishes a deletion whose object outlived it (storage was down): the sweeper removes the object', async () => {
    const job = await finishedJob('a stubborn object');
    // As if the object removal had failed: the row is deleted but still names its object.
    await db.$executeRaw`UPDATE generated_images SET deleted_at = now(), prompt = '', negative_prompt = NULL WHERE id = ${job.id}::uuid`;
    expect(await storage.list(`images/${job.id}/`)).toHaveLength(1);
    await until('the sweeper to remove the object', 15_000, async () => ((await storage.list(`images/${job.id}/`)).length === 0 ? true : undefined));
    await expectGone(job.id, job.url, 'a stubborn object');
  });
});
