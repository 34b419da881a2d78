/**
 * The textbook's session against the running system: the API process (startApi) and a worker
 * (startWorker, with the oracle test model) on real Postgres, Redis and S3, driven over HTTP
 * with fetch as a user would, with an API key: submit, poll until done, fetch the URL, look at
 * the picture.
 */
import pg from 'pg';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApi, type RunningApi } from '../../src/api/main.js';
import type { Config } from '../../src/config.js';
import { guidedTargetLatent, oracleImage } from '../../src/engine/testmodels/oracle-spec.js';
import { startWorker, type RunningWorker } from '../../src/worker/main.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';
import { centroidOf, meanAbs } from '../support/pixels.js';

interface ImageJson {
  id: string;
  status: 'queued' | 'running' | 'succeeded' | 'failed' | 'canceled';
  progress: number;
  prompt: string;
  negative_prompt: string | null;
  num_steps: number;
  guidance_scale: number;
  seed: number;
  width: number;
  height: number;
  scheduler: string;
  file_name: string | null;
  error: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
}

let config: Config;
let api: RunningApi | undefined;
let worker: RunningWorker | undefined;
let auth: { authorization: string };

beforeAll(async () => {
  config = await isolatedConfig();
  ({ auth } = await createTestKey(config.DATABASE_URL));
  [api, worker] = await Promise.all([startApi(config), startWorker(config)]);
});

afterAll(async () => {
  await Promise.allSettled([api?.close(), worker?.close()]);
});

async function post(body: unknown): Promise<{ status: number; location: string | null; json: ImageJson }> {
  const res = await fetch(`${api!.url}/generated-images`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: res.status, location: res.headers.get('location'), json: (await res.json()) as ImageJson };
}

async function getImage(id: string): Promise<ImageJson> {
  const res = await fetch(`${api!.url}/generated-images/${id}`, { headers: auth });
  expect(res.status).toBe(200);
  return (await res.json()) as ImageJson;
}

/** How often waitForDone asks; only completion is waited for this way (ms). */
const POLL_MS = 100;

/** Polls GET /generated-images/{id} until the job is finished, recording what a user would see on the way. */
async function waitForDone(id: string, timeoutMs = 90_000): Promise<{ final: ImageJson; seen: ImageJson[] }> {
  const deadline = Date.now() + timeoutMs;
  const seen: ImageJson[] = [];
  for (;;) {
    const job = await getImage(id);
    seen.push(job);
    if (job.status === 'succeeded' || job.status === 'failed' || job.status === 'canceled') return { final: job, seen };
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status} at ${job.progress}% after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/** An advisory lock key of this test's own (the migration runner uses another). */
const HOLD_LOCK = 731_204;

/**
 * Holds every job of this file's database right after its first progress write, so that a user's
 * GET sees it part-way however fast the engine is: a trigger lets a job's first progress write
 * (0 -> p) through and announces it with NOTIFY (delivered at commit), and makes every later
 * one, the final `succeeded` write included, wait for an advisory lock the test holds until
 * release(). The worker is not touched: it just finds its next UPDATE slow.
 */
async function holdJobsAfterFirstProgress(databaseUrl: string): Promise<{
  firstProgress(id: string, timeoutMs: number): Promise<void>;
  release(): Promise<void>;
  close(): Promise<void>;
}> {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  const announced = new Set<string>();
  const waiters = new Map<string, () => void>();
  client.on('notification', (n) => {
    if (n.channel !== 't2i_test_progress' || !n.payload) return;
    announced.add(n.payload);
    waiters.get(n.payload)?.();
  });
  await client.query(`
    CREATE FUNCTION t2i_test_hold_progress() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.progress > OLD.progress THEN
        IF OLD.progress > 0 THEN
          PERFORM pg_advisory_xact_lock_shared(${HOLD_LOCK});
        ELSE
          PERFORM pg_notify('t2i_test_progress', NEW.id::text);
        END IF;
      END IF;
      RETURN NEW;
    END $$`);
  await client.query(`CREATE TRIGGER t2i_test_hold_progress BEFORE UPDATE ON generated_images FOR EACH ROW EXECUTE FUNCTION t2i_test_hold_progress()`);
  await client.query('LISTEN t2i_test_progress');
  await client.query(`SELECT pg_advisory_lock(${HOLD_LOCK})`);
  let held = true;
  const release = async () => {
    if (!held) return;
    held = false;
    await client.query(`SELECT pg_advisory_unlock(${HOLD_LOCK})`);
  };
  return {
    firstProgress: (id, timeoutMs) =>
      new Promise<void>((resolve, reject) => {
        if (announced.has(id)) return resolve();
        const timer = setTimeout(() => reject(new Error(`job ${id} wrote no progress within ${timeoutMs} ms`)), timeoutMs);
        waiters.set(id, () => {
          clearTimeout(timer);
          resolve();
        });
      }),
    release,
    close: async () => {
      // Releasing first: a held job must never outlive the test.
      await release();
      await client.query('DROP TRIGGER t2i_test_hold_progress ON generated_images');
      await client.query('DROP FUNCTION t2i_test_hold_progress()');
      await client.end();
    },
  };
}

async function download(id: string): Promise<Buffer> {
  const res = await fetch(`${api!.url}/generated-images/${id}/url`, { headers: auth });
  expect(res.status).toBe(200);
  const { url } = (await res.json()) as { url: string; expires_at: string };
  const file = await fetch(url);
  expect(file.status).toBe(200);
  return Buffer.from(await file.arrayBuffer());
}

async function pixels(png: Buffer): Promise<{ data: Buffer; width: number; height: number }> {
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  expect(info.channels).toBe(3);
  return { data, width: info.width, height: info.height };
}

describe('the textbook session, end to end', () => {
  it('"a red circle on the left": 201, progress climbs to 100, and the URL downloads the expected picture', async () => {
    const prompt = 'a red circle on the left';
    const hold = await holdJobsAfterFirstProgress(config.DATABASE_URL);
    let created: Awaited<ReturnType<typeof post>>;
    let partWay: ImageJson;
    try {
      created = await post({ prompt, num_steps: 20, seed: 42 });
      expect(created.status).toBe(201);
      expect(created.location).toBe(`/generated-images/${created.json.id}`);
      expect(created.json).toMatchObject({
        progress: 0,
        prompt,
        num_steps: 20,
        seed: 42,
        file_name: null,
        error: null,
        width: 512,
        height: 512,
        scheduler: 'pndm',
        guidance_scale: 9,
      });
      expect(['queued', 'running']).toContain(created.json.status);

      // Before the job is done, the URL route answers the textbook's 400 (the job cannot finish while held).
      const early = await fetch(`${api!.url}/generated-images/${created.json.id}/url`, { headers: auth });
      expect(early.status).toBe(400);
      expect(early.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(((await early.json()) as { detail: string }).detail).toBe('Image is not available yet. Please try again later.');

      // The user sees the job part-way through: running, with progress between 0 and 100.
      await hold.firstProgress(created.json.id, 60_000);
      partWay = await getImage(created.json.id);
      expect(partWay.status).toBe('running');
      expect(partWay.progress).toBeGreaterThan(0);
      expect(partWay.progress).toBeLessThan(100);
      expect(partWay.file_name).toBeNull();
    } finally {
      await hold.close();
    }

    const { final, seen } = await waitForDone(created.json.id);
    expect(final.error).toBeNull();
    expect(final.status).toBe('succeeded');
    expect(final.progress).toBe(100);
    expect(final.file_name).toEqual(expect.any(String));
    expect(final.started_at).toEqual(expect.any(String));
    expect(final.finished_at).toEqual(expect.any(String));
    const createdAt = Date.parse(final.created_at);
    const startedAt = Date.parse(final.started_at!);
    const finishedAt = Date.parse(final.finished_at!);
    expect(startedAt).toBeGreaterThanOrEqual(createdAt);
    expect(finishedAt).toBeGreaterThanOrEqual(startedAt);

    // Progress as the user saw it never goes back; status only moves forward.
    const progress = [created.json.progress, partWay.progress, ...seen.map((s) => s.progress)];
    for (let i = 1; i < progress.length; i++) expect(progress[i]!, `progress went ${progress.join(' → ')}`).toBeGreaterThanOrEqual(progress[i - 1]!);
    expect(progress.at(-1)).toBe(100);
    for (const p of progress) expect(p >= 0 && p <= 100).toBe(true);
    const rank = { queued: 0, running: 1, succeeded: 2, failed: 2, canceled: 2 } as const;
    const statuses = [partWay, ...seen].map((s) => rank[s.status]);
    for (let i = 1; i < statuses.length; i++) expect(statuses[i]!).toBeGreaterThanOrEqual(statuses[i - 1]!);
    // Only a succeeded job carries a file name.
    for (const s of seen) if (s.status !== 'succeeded') expect(s.file_name).toBeNull();

    const urlRes = await fetch(`${api!.url}/generated-images/${created.json.id}/url`, { headers: auth });
    expect(urlRes.status).toBe(200);
    const { url, expires_at } = (await urlRes.json()) as { url: string; expires_at: string };
    // Valid for PRESIGN_TTL_SECONDS (1 hour by default), not the textbook's 7 days.
    expect(Math.abs(Date.parse(expires_at) - (Date.now() + config.PRESIGN_TTL_SECONDS * 1000))).toBeLessThan(60_000);
    const file = await fetch(url);
    expect(file.status).toBe(200);
    const png = Buffer.from(await file.arrayBuffer());
    expect(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))).toBe(true);

    const img = await pixels(png);
    expect([img.width, img.height]).toEqual([512, 512]);
    // The oracle's picture for the prompt at guidance 9; PNDM leaves a little noise by design.
    const expected = oracleImage(guidedTargetLatent(prompt, '', 9, 64, 64), 64, 64);
    expect(meanAbs(img.data, expected)).toBeLessThan(4);
    const disc = centroidOf(img, [255, 0, 0]);
    expect(disc.fraction).toBeGreaterThan(0.05);
    expect(disc.x).toBeLessThan(0.5);
    expect(Math.abs(disc.x - 0.25)).toBeLessThan(0.03);
    expect(Math.abs(disc.y - 0.5)).toBeLessThan(0.03);
  }, 120_000);

  it('jobs submitted back to back both succeed, and the same seed and prompt give the same image', async () => {
    const a = await post({ prompt: 'a blue square on the right', num_steps: 10, seed: 7, scheduler: 'ddim' });
    const b = await post({ prompt: 'a green circle at the top', num_steps: 10, seed: 1234 });
    expect([a.status, b.status]).toEqual([201, 201]);
    const [doneA, doneB] = await Promise.all([waitForDone(a.json.id), waitForDone(b.json.id)]);
    expect(doneA.final).toMatchObject({ status: 'succeeded', progress: 100, error: null });
    expect(doneB.final).toMatchObject({ status: 'succeeded', progress: 100, error: null });

    const c = await post({ prompt: 'a green circle at the top', num_steps: 10, seed: 1234 });
    expect(c.status).toBe(201);
    expect(c.json.id).not.toBe(b.json.id);
    const doneC = await waitForDone(c.json.id);
    expect(doneC.final).toMatchObject({ status: 'succeeded', progress: 100, error: null });
    expect(doneC.final.file_name).not.toBe(doneB.final.file_name);

    const [pngA, pngB, pngC] = await Promise.all([download(a.json.id), download(b.json.id), download(c.json.id)]);
    const [imgA, imgB, imgC] = await Promise.all([pixels(pngA), pixels(pngB), pixels(pngC)]);
    // Reproducible through the whole system: same seed and prompt, same pixels (and the same file).
    expect(imgC.data.equals(imgB.data)).toBe(true);
    expect(pngC.equals(pngB)).toBe(true);
    // And each picture is what its prompt asked for.
    expect(imgA.data.equals(imgB.data)).toBe(false);
    const blue = centroidOf(imgA, [0, 0, 255]);
    expect(blue.fraction).toBeGreaterThan(0.05);
    expect(blue.x).toBeGreaterThan(0.5);
    const green = centroidOf(imgB, [0, 255, 0]);
    expect(green.fraction).toBeGreaterThan(0.05);
    expect(green.y).toBeLessThan(0.5);
  }, 180_000);

  it('a different seed gives a different image for the same prompt', async () => {
    const one = await post({ prompt: 'a yellow dot', num_steps: 5, seed: 1 });
    const two = await post({ prompt: 'a yellow dot', num_steps: 5, seed: 2 });
    await Promise.all([waitForDone(one.json.id), waitForDone(two.json.id)]);
    const [p1, p2] = await Promise.all([download(one.json.id), download(two.json.id)]);
    const [i1, i2] = await Promise.all([pixels(p1), pixels(p2)]);
    expect(i1.data.equals(i2.data)).toBe(false);
  }, 120_000);
});
