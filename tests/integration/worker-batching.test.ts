/**
 * A worker with BATCH_MAX 3 (startWorker, the oracle test model, real Postgres, Redis and S3),
 * driven over HTTP as a user would: jobs submitted together share each step's UNet run, and each
 * still ends with its own image, the very bytes the same job gets when it runs alone. The images
 * of a job of several are generations like any others: they share runs with another job's.
 */
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApi, type RunningApi } from '../../src/api/main.js';
import { createLogger } from '../../src/core/logger.js';
import { readPngText } from '../../src/engine/png.js';
import { startWorker, type RunningWorker } from '../../src/worker/main.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

let api: RunningApi | undefined;
let worker: RunningWorker | undefined;
let auth: { authorization: string };
/** The worker's log, one JSON object per line. */
const lines: Array<Record<string, unknown>> = [];

beforeAll(async () => {
  const config = await isolatedConfig({ BATCH_MAX: '3', BATCH_WAIT_MS: '5000' });
  ({ auth } = await createTestKey(config.DATABASE_URL));
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(line) as Record<string, unknown>);
      cb();
    },
  });
  const silent = createLogger({ name: 'api', level: 'silent', pretty: false });
  [api, worker] = await Promise.all([
    startApi(config, { logger: silent }),
    startWorker(config, { logger: createLogger({ name: 'worker', level: 'info', pretty: false, destination }) }),
  ]);
});

afterAll(async () => {
  await Promise.allSettled([api?.close(), worker?.close()]);
});

async function submit(body: object): Promise<string> {
  const res = await fetch(`${api!.url}/generated-images`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  expect(res.status).toBe(201);
  return ((await res.json()) as { id: string }).id;
}

/** Waits for the job to succeed and downloads its PNG through its presigned URL. */
async function picture(id: string): Promise<Buffer> {
  return (await pictures(id))[0]!;
}

/** Waits for the job to succeed and downloads every image it made, image 0 first. */
async function pictures(id: string): Promise<Buffer[]> {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const job = (await (await fetch(`${api!.url}/generated-images/${id}`, { headers: auth })).json()) as { status: string; progress: number };
    if (job.status === 'succeeded') {
      expect(job.progress).toBe(100);
      break;
    }
    expect(['queued', 'running']).toContain(job.status);
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const answer = (await (await fetch(`${api!.url}/generated-images/${id}/url`, { headers: auth })).json()) as { url: string; images?: Array<{ url: string }> };
  const urls = answer.images?.map((i) => i.url) ?? [answer.url];
  return Promise.all(urls.map(async (url) => Buffer.from(await (await fetch(url)).arrayBuffer())));
}

const batchSizeOf = (id: string) => lines.find((l) => l.msg === 'job succeeded' && l.jobId === id)?.batchSize;

describe('a worker that batches', () => {
  it('says what it can batch when it loads', () => {
    expect(lines.find((l) => l.msg === 'model loaded')).toMatchObject({ batchMax: 3, concurrency: 6 });
  });

  it('runs jobs submitted together as one batch, each with the image it gets alone', async () => {
    // Euler ancestral draws noise at every step: each job must draw it from its own generator.
    const bodies = [
      { prompt: 'a red circle on the left', seed: 1 },
      { prompt: 'a blue square at the top', seed: 2, negative_prompt: 'green' },
      { prompt: 'a big green circle', seed: 3, guidance_scale: 6 },
    ].map((b) => ({ ...b, num_steps: 8, width: 128, height: 128, scheduler: 'euler_ancestral' }));

    const together = await Promise.all(bodies.map(submit));
    const batched = await Promise.all(together.map(picture));
    expect(together.map(batchSizeOf)).toEqual([3, 3, 3]);

    // The same requests one at a time: each waits out BATCH_WAIT_MS and runs alone.
    for (const [i, body] of bodies.entries()) {
      const id = await submit(body);
      const alone = await picture(id);
      expect(batchSizeOf(id)).toBe(1);
      expect(alone.equals(batched[i]!), `job ${i} alone differs from its batched image`).toBe(true);
    }
  });

  it("a job's several images batch with another job's generation, each the image its seed gives alone", async () => {
    const base = { num_steps: 8, width: 128, height: 128, scheduler: 'euler_ancestral', guidance_scale: 7 };
    const several = { ...base, prompt: 'a red square at the top', seed: 4294967295, num_images: 2 };
    const single = { ...base, prompt: 'a big blue circle', seed: 7 };
    const [a, b] = await Promise.all([submit(several), submit(single)]);
    const [images, image] = await Promise.all([pictures(a), picture(b)]);
    expect(images).toHaveLength(2);
    // Two images of one job and one of another: one batch of three generations.
    expect([batchSizeOf(a), batchSizeOf(b)]).toEqual([3, 3]);

    // The same images one job at a time; seeds wrap at 2^32.
    const seeds = [4294967295, 0];
    for (const [k, seed] of seeds.entries()) {
      const id = await submit({ ...several, num_images: 1, seed });
      const alone = await picture(id);
      expect(batchSizeOf(id)).toBe(1);
      expect(alone.equals(images[k]!), `image ${k} alone differs from its batched image`).toBe(true);
    }
    const id = await submit(single);
    expect((await picture(id)).equals(image)).toBe(true);
    expect(images.map((png) => readPngText(png).seed)).toEqual(seeds.map(String));
  }, 120_000);
});
