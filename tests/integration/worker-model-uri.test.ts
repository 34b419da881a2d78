/**
 * A worker that takes its model from the object store: the oracle model pushed to S3 with
 * `t2i models push`, a worker started with MODEL_URI (no MODEL_DIR) syncs it into its cache,
 * loads it and runs a job a user submits over HTTP; a restarted worker on the same cache
 * downloads nothing and runs the next job. Real API, worker, Postgres, Redis and S3 (Swift).
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startApi, type RunningApi } from '../../src/api/main.js';
import type { Config } from '../../src/config.js';
import { createLogger } from '../../src/core/logger.js';
import { sha256File } from '../../src/core/model-cache.js';
import { startWorker } from '../../src/worker/main.js';
import { createTestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

const run = promisify(execFile);
const services = inject('services');
const modelUri = `s3://t2i-models-${randomUUID().slice(0, 8)}/oracle-sd/`;
const cacheDir = mkdtempSync(path.join(os.tmpdir(), 't2i-worker-cache-'));
let config: Config;
let api: RunningApi | undefined;
let auth: { authorization: string };

function capture() {
  const lines: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { lines, logger: createLogger({ name: 'worker', level: 'info', pretty: false, destination }) };
}

beforeAll(async () => {
  const s3 = {
    STORAGE_ENDPOINT: services.s3.endpoint,
    STORAGE_ACCESS_KEY: services.s3.accessKey,
    STORAGE_SECRET_KEY: services.s3.secretKey,
    STORAGE_REGION: services.s3.region,
  };
  await run(process.execPath, [path.resolve('bin/t2i.js'), 'models', 'push', services.oracleModelDir, modelUri], { env: { ...process.env, ...s3 } });
  config = await isolatedConfig({ MODEL_DIR: '', MODEL_URI: modelUri, MODEL_CACHE_DIR: cacheDir });
  ({ auth } = await createTestKey(config.DATABASE_URL));
  api = await startApi(config, { logger: createLogger({ name: 'api', level: 'silent' }) });
}, 120_000);

afterAll(async () => {
  await api?.close();
  rmSync(cacheDir, { recursive: true, force: true });
});

async function generate(prompt: string): Promise<Buffer> {
  const res = await fetch(`${api!.url}/generated-images`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, num_steps: 4, seed: 7, width: 64, height: 64 }),
  });
  expect(res.status).toBe(201);
  const { id } = (await res.json()) as { id: string };
  const deadline = Date.now() + 60_000;
  for (;;) {
    const job = (await (await fetch(`${api!.url}/generated-images/${id}`, { headers: auth })).json()) as { status: string; error: string | null };
    if (job.status === 'succeeded') break;
    if (job.status === 'failed' || job.status === 'canceled' || Date.now() > deadline) throw new Error(`job ${id}: ${job.status} ${job.error}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const { url } = (await (await fetch(`${api!.url}/generated-images/${id}/url`, { headers: auth })).json()) as { url: string };
  return Buffer.from(await (await fetch(url)).arrayBuffer());
}

describe('a worker with MODEL_URI', () => {
  it('syncs the export from S3, loads it and runs jobs; after a restart it reuses the cache', async () => {
    expect(config.MODEL_DIR).toBeUndefined();
    const first = capture();
    const worker = await startWorker(config, { logger: first.logger });
    const png = await generate('a red circle on the left');
    await worker.close();
    expect((await sharp(png).metadata()).width).toBe(64);

    const synced = first.lines.find((l) => l.msg === 'model synced from the object store');
    expect(synced, JSON.stringify(first.lines.map((l) => l.msg))).toMatchObject({ outcome: 'downloaded', modelUri });
    expect(synced!.downloadedBytes).toBe(synced!.totalBytes);
    const modelDir = synced!.modelDir as string;
    expect(modelDir.startsWith(cacheDir)).toBe(true);
    const loaded = first.lines.find((l) => l.msg === 'model loaded');
    expect(loaded?.modelDir).toBe(modelDir);
    // The cached copy is the pushed export, byte for byte.
    for (const f of ['unet/model.onnx', 'text_encoder/model.onnx', 'tokenizer/vocab.json']) {
      expect(await sha256File(path.join(modelDir, f)), f).toBe(await sha256File(path.join(services.oracleModelDir, f)));
    }

    const second = capture();
    const restarted = await startWorker(config, { logger: second.logger });
    try {
      const reused = second.lines.find((l) => l.msg === 'model found complete in the cache');
      expect(reused).toMatchObject({ outcome: 'complete', downloadedBytes: 0, modelDir });
      const again = await generate('a red circle on the left');
      // Same prompt, seed and model: the same picture.
      expect(again.equals(png)).toBe(true);
    } finally {
      await restarted.close();
    }
  });
});
