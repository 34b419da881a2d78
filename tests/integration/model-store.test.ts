/**
 * Models served from the object store, against the real S3 server (Swift) of the global setup:
 * `t2i models push` as a real process, then the worker's sync into a local cache: a first
 * download, reuse, two syncs at once on one host, a download cut off mid-file (aborted, and a
 * SIGKILLed process whose lock goes stale), a damaged cache, and a corrupted object.
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createModelStore } from '../../src/adapters/model-store.js';
import { MANIFEST_NAME, readManifest, sha256File, syncModel, type Log, type ModelStore } from '../../src/core/model-cache.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/t2i.js');
const s3 = inject('services').s3;
const bucket = `t2i-models-${randomUUID().slice(0, 8)}`;
const work = mkdtempSync(path.join(os.tmpdir(), 't2i-model-store-'));
const exportDir = path.join(work, 'export');
/** Large enough that a download takes a while on loopback, so it can be cut off part-way. */
const BLOB_BYTES = 48 * 1024 * 1024;

const env = { STORAGE_ENDPOINT: s3.endpoint, STORAGE_ACCESS_KEY: s3.accessKey, STORAGE_SECRET_KEY: s3.secretKey, STORAGE_REGION: s3.region };
const storeAt = (prefix: string): ModelStore =>
  createModelStore(`s3://${bucket}/${prefix}`, { endpoint: s3.endpoint, accessKey: s3.accessKey, secretKey: s3.secretKey, region: s3.region });
const logs: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
const log: Log = (level, msg, fields = {}) => void logs.push({ level, msg, fields });
const freshCache = () => mkdtempSync(path.join(work, 'cache-'));

beforeAll(async () => {
  mkdirSync(path.join(exportDir, 'unet'), { recursive: true });
  const index = JSON.stringify({ _class_name: 'OnnxStableDiffusionPipeline' });
  writeFileSync(path.join(exportDir, 'model_index.json'), index);
  writeFileSync(path.join(exportDir, 'unet', 'weights.pb'), randomBytes(BLOB_BYTES));
  writeFileSync(path.join(exportDir, 'unet', 'model.onnx'), randomBytes(1000));
  const { stdout } = await run(process.execPath, [BIN, 'models', 'push', exportDir, `s3://${bucket}/sd/`], { env: { ...process.env, ...env } });
  expect(stdout).toMatch(new RegExp(`^pushed 3 files, ${BLOB_BYTES + 1000 + index.length} bytes, to s3://${bucket}/sd/ in [\\d.]+ s\\n$`));
}, 120_000);

afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('t2i models push', () => {
  it('uploads every file and then a manifest of sizes and checksums', async () => {
    const { manifest } = await readManifest(storeAt('sd/'));
    expect(manifest.files.map((f) => f.path)).toEqual(['model_index.json', 'unet/model.onnx', 'unet/weights.pb']);
    for (const f of manifest.files) {
      const local = path.join(exportDir, f.path);
      expect(f.size).toBe(statSync(local).size);
      expect(f.sha256).toBe(await sha256File(local));
    }
  });

  it('refuses a folder that is not a model export', async () => {
    const empty = mkdtempSync(path.join(work, 'empty-'));
    const r = await run(process.execPath, [BIN, 'models', 'push', empty, `s3://${bucket}/nothing/`], { env: { ...process.env, ...env } }).catch(
      (e: { code: number; stderr: string }) => e,
    );
    expect('code' in r ? r.code : 0).toBe(1);
    expect((r as { stderr: string }).stderr).toContain(`${empty}: no model_index.json here`);
  });
});

describe('syncing an export into the cache', () => {
  it('downloads and verifies it once; a second sync (a restart, another worker) downloads nothing', async () => {
    const cache = freshCache();
    const first = await syncModel(storeAt('sd/'), cache, { log });
    expect(first).toMatchObject({ outcome: 'downloaded', downloadedBytes: first.totalBytes, resumedBytes: 0 });
    expect(path.basename(first.dir)).toBe('sd');
    for (const f of ['model_index.json', 'unet/model.onnx', 'unet/weights.pb']) {
      expect(await sha256File(path.join(first.dir, f))).toBe(await sha256File(path.join(exportDir, f)));
    }
    const again = await syncModel(storeAt('sd/'), cache, { log });
    expect(again).toMatchObject({ outcome: 'complete', downloadedBytes: 0, dir: first.dir });
  });

  it('lets one of two syncs on the same host download while the other waits for it', async () => {
    const cache = freshCache();
    let second: Promise<Awaited<ReturnType<typeof syncModel>>> | undefined;
    const first = syncModel(storeAt('sd/'), cache, {
      log,
      pollMs: 50,
      // Start the second sync only once the first holds the lock and bytes are arriving.
      onProgress: () => void (second ??= syncModel(storeAt('sd/'), cache, { log, pollMs: 50 })),
    });
    const [a, b] = [await first, await second!];
    expect(a.outcome).toBe('downloaded');
    expect(b.outcome).toBe('waited');
    expect(a.downloadedBytes + b.downloadedBytes).toBe(a.totalBytes);
    expect(logs.some((l) => l.msg === 'another process is syncing this model; waiting for it')).toBe(true);
  });

  it('continues an interrupted download from where it stopped', async () => {
    const cache = freshCache();
    const abort = new AbortController();
    const cut = syncModel(storeAt('sd/'), cache, {
      log,
      signal: abort.signal,
      onProgress: (rel, bytes) => {
        if (rel === 'unet/weights.pb' && bytes > BLOB_BYTES / 3) abort.abort();
      },
    });
    await expect(cut).rejects.toThrow(/abort/i);
    const base = readdirSync(cache).find((d) => !d.endsWith('.lock'))!;
    expect(readdirSync(cache), 'the lock was released').not.toContain(`${base}.lock`);
    const part = path.join(cache, base, 'sd', 'unet', 'weights.pb.part');
    const partBytes = statSync(part).size;
    // What reached the disk before the abort: at most what had arrived.
    expect(partBytes).toBeGreaterThan(0);
    expect(partBytes).toBeLessThan(BLOB_BYTES);

    const resumed = await syncModel(storeAt('sd/'), cache, { log });
    expect(resumed.outcome).toBe('downloaded');
    expect(resumed.resumedBytes).toBe(partBytes);
    // The files before weights.pb were finished by the first run; only the rest of weights.pb is fetched.
    expect(resumed.downloadedBytes).toBe(BLOB_BYTES - partBytes);
    expect(await sha256File(path.join(resumed.dir, 'unet', 'weights.pb'))).toBe(await sha256File(path.join(exportDir, 'unet', 'weights.pb')));
  });

  it('takes over from a SIGKILLed process once its lock goes stale, and resumes its partial file', async () => {
    const cache = freshCache();
    const child = spawn(process.execPath, [BIN, 'models', 'pull', `s3://${bucket}/sd/`, '--cache', cache], {
      env: { ...process.env, ...env },
      stdio: 'ignore',
    });
    const exited = new Promise((r) => child.once('exit', r));
    // Stop it the moment its partial file has data, then kill it: no clean-up runs.
    let part: string | undefined;
    const deadline = Date.now() + 60_000;
    while (!part && Date.now() < deadline) {
      const base = existsSync(cache) ? readdirSync(cache).find((d) => !d.includes('.lock')) : undefined;
      const p = base && path.join(cache, base, 'sd', 'unet', 'weights.pb.part');
      if (p && existsSync(p) && statSync(p).size > 0) part = p;
      else await new Promise((r) => setTimeout(r, 2));
    }
    child.kill('SIGSTOP');
    child.kill('SIGKILL');
    await exited;
    expect(part, 'the child started downloading weights.pb').toBeDefined();
    const partBytes = statSync(part!).size;
    expect(partBytes).toBeLessThan(BLOB_BYTES);
    expect(
      readdirSync(cache).some((d) => d.endsWith('.lock')),
      'the killed process left its lock',
    ).toBe(true);

    const started = Date.now();
    const r = await syncModel(storeAt('sd/'), cache, { log, staleMs: 1_500, pollMs: 100 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(1_000);
    expect(logs.some((l) => l.msg.startsWith('took over a stale model cache lock'))).toBe(true);
    expect(r.outcome).toBe('downloaded');
    expect(r.resumedBytes).toBe(partBytes);
    expect(r.downloadedBytes).toBe(BLOB_BYTES - partBytes);
    expect(await sha256File(path.join(r.dir, 'unet', 'weights.pb'))).toBe(await sha256File(path.join(exportDir, 'unet', 'weights.pb')));
  });

  it('notices a damaged cache and fetches only the damaged file again', async () => {
    const cache = freshCache();
    const first = await syncModel(storeAt('sd/'), cache, { log });
    truncateSync(path.join(first.dir, 'unet', 'model.onnx'), 10);
    const r = await syncModel(storeAt('sd/'), cache, { log });
    expect(r).toMatchObject({ outcome: 'downloaded', downloadedBytes: 1000 });
  });

  it('refuses an object whose checksum does not match the manifest, and says where it is', async () => {
    // Copy the export to a prefix of its own, then replace one object with other bytes of the same size.
    const store = storeAt('corrupt/');
    await run(process.execPath, [BIN, 'models', 'push', exportDir, `s3://${bucket}/corrupt/`], { env: { ...process.env, ...env } });
    await store.writeSmall('unet/model.onnx', randomBytes(1000));
    const cache = freshCache();
    await expect(syncModel(store, cache, { log })).rejects.toThrow(
      new RegExp(`^s3://${bucket}/corrupt/unet/model\\.onnx: sha256 [0-9a-f]{64} does not match the manifest's [0-9a-f]{64}; the object is corrupted`),
    );
    const base = readdirSync(cache).find((d) => !d.endsWith('.lock'))!;
    const dir = path.join(cache, base, 'corrupt');
    expect(existsSync(path.join(dir, 'unet', 'model.onnx'))).toBe(false);
    expect(existsSync(path.join(dir, 'unet', 'model.onnx.part'))).toBe(false);
    expect(existsSync(path.join(cache, base, '.t2i-complete'))).toBe(false);
    expect(readdirSync(cache).filter((d) => d.endsWith('.lock'))).toEqual([]);
  });

  it('says how to push an export when the prefix holds none', async () => {
    await expect(syncModel(storeAt('missing/'), freshCache(), { log })).rejects.toThrow(
      `s3://${bucket}/missing/${MANIFEST_NAME}: not found; upload the export with \`t2i models push DIR s3://${bucket}/missing/\``,
    );
  });
});
