/**
 * `t2i doctor` as an operator runs it: a real process, configured by environment variables,
 * against the real Postgres, Redis and S3 of the global setup, with a good model, a broken one,
 * a model in S3, and settings that cannot work here. Secrets in the configuration never appear
 * in what it prints.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createStorage } from '../../src/adapters/storage.js';
import { storageOptions } from '../../src/core/wiring.js';
import type { Config } from '../../src/config.js';
import { isolatedConfig } from '../support/system.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/t2i.js');
const services = inject('services');
const work = mkdtempSync(path.join(os.tmpdir(), 't2i-doctor-'));
/** A password in DATABASE_URL: the test Postgres trusts local connections, so any password connects. */
const DB_PASSWORD = `pw-${randomUUID()}`;
let config: Config;
let env: Record<string, string>;

interface Checked {
  code: number;
  out: string;
  checks: { name: string; status: string; detail: string }[];
}

async function doctor(overrides: Record<string, string> = {}, args: string[] = []): Promise<Checked> {
  const childEnv = { ...process.env, ...env, ...overrides };
  let r: { code: number; stdout: string; stderr: string };
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, 'doctor', '--json', ...args], { env: childEnv });
    r = { code: 0, stdout, stderr };
  } catch (err) {
    r = err as { code: number; stdout: string; stderr: string };
  }
  const parsed = JSON.parse(r.stdout) as { ok: boolean; checks: Checked['checks'] };
  expect(parsed.ok).toBe(r.code === 0);
  return { code: r.code, out: r.stdout + r.stderr, checks: parsed.checks };
}
const statusOf = (c: Checked) => Object.fromEntries(c.checks.map((x) => [x.name, x.status]));
const detailOf = (c: Checked, name: string) => c.checks.find((x) => x.name === name)?.detail ?? '';

beforeAll(async () => {
  config = await isolatedConfig();
  await createStorage(storageOptions(config)).ensureBucket();
  const db = new URL(config.DATABASE_URL);
  db.password = DB_PASSWORD;
  env = {
    DATABASE_URL: db.toString(),
    REDIS_URL: config.REDIS_URL,
    STORAGE_ENDPOINT: config.STORAGE_ENDPOINT,
    STORAGE_ACCESS_KEY: config.STORAGE_ACCESS_KEY,
    STORAGE_SECRET_KEY: config.STORAGE_SECRET_KEY,
    STORAGE_REGION: config.STORAGE_REGION,
    STORAGE_BUCKET: config.STORAGE_BUCKET,
    MODEL_DIR: services.oracleModelDir,
    MODEL_URI: '',
    EXECUTION_PROVIDER: 'cpu',
    METRICS_TOKEN: `token-${randomUUID()}`,
  };
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

function expectNoSecrets(r: Checked) {
  for (const s of [DB_PASSWORD, env.STORAGE_SECRET_KEY!, env.METRICS_TOKEN!]) expect(r.out, 'a secret was printed').not.toContain(s);
}

describe('t2i doctor', () => {
  it('reports every condition on a healthy CPU host and exits 0', async () => {
    const r = await doctor();
    expect(r.code, r.out).toBe(0);
    expect(statusOf(r)).toEqual({ node: 'ok', config: 'ok', onnxruntime: 'ok', cuda: 'skip', model: 'ok', postgres: 'ok', redis: 'ok', s3: 'ok' });
    expect(detailOf(r, 'node')).toBe(`${process.version} (${process.platform} ${process.arch})`);
    expect(detailOf(r, 'onnxruntime')).toMatch(/^onnxruntime-node 1\.30\.0; built with cpu, .*cuda \(separate library\).*; usable here: cpu$/);
    expect(detailOf(r, 'cuda')).toContain('libonnxruntime_providers_cuda.so is not installed beside the binding');
    expect(detailOf(r, 'model')).toMatch(
      /^\/.*oracle: SD 1\.x\/2\.x-shaped \(text hidden size 16\) \(text encoder width 16\), fp32 UNet, epsilon prediction, PNDMScheduler, .*input_ids int32, timestep float32; \d+ bytes$/,
    );
    expect(detailOf(r, 'postgres')).toContain(':***@127.0.0.1:');
    expect(detailOf(r, 'redis')).toContain('maxmemory-policy noeviction');
    expect(detailOf(r, 's3')).toBe(`${env.STORAGE_ENDPOINT} bucket ${env.STORAGE_BUCKET} reachable`);
    expectNoSecrets(r);
  });

  it('names every problem of a broken model directory and exits 1', async () => {
    const broken = path.join(work, 'broken-model');
    cpSync(services.oracleModelDir, broken, { recursive: true });
    unlinkSync(path.join(broken, 'unet', 'model.onnx'));
    writeFileSync(path.join(broken, 'scheduler', 'scheduler_config.json'), '{"_class_name": ');
    writeFileSync(path.join(broken, 'vae_decoder', 'model.onnx'), 'not a protobuf at all');
    const r = await doctor({ MODEL_DIR: broken });
    expect(r.code).toBe(1);
    expect(statusOf(r)).toMatchObject({ model: 'fail', postgres: 'ok', redis: 'ok', s3: 'ok' });
    const model = detailOf(r, 'model');
    expect(model).toContain(`MODEL_DIR ${broken} is not a usable model:`);
    expect(model).toContain(`${broken}/scheduler/scheduler_config.json: not valid JSON`);
    expect(model).toContain(`${broken}/unet/model.onnx: file not found (expected the unet ONNX model)`);
    expect(model).toContain(`${broken}/vae_decoder/model.onnx: not a readable ONNX model`);
    expect(r.out).toContain('t2i doctor: 1 problem: model');
  });

  it('tells an fp16 export from an fp32 one', async () => {
    const dir = path.join(work, 'models');
    await run(process.execPath, [BIN, 'make-test-models', dir, '--kind', 'random', '--fp16', '--timestep', 'int64', '--ids', 'int64']);
    const r = await doctor({ MODEL_DIR: path.join(dir, 'random') });
    expect(r.code, r.out).toBe(0);
    expect(detailOf(r, 'model')).toContain('fp16 UNet, epsilon prediction');
    expect(detailOf(r, 'model')).toContain('input_ids int64, timestep int64');
  });

  it('fails when the configuration asks for CUDA and this host has no CUDA provider', async () => {
    const r = await doctor({ EXECUTION_PROVIDER: 'cuda' });
    expect(r.code).toBe(1);
    expect(statusOf(r).cuda).toBe('fail');
    expect(detailOf(r, 'cuda')).toMatch(/^EXECUTION_PROVIDER=cuda, but libonnxruntime_providers_cuda\.so is not installed/);
  });

  it('fails on services it cannot reach and on an invalid configuration, without printing secrets', async () => {
    const badS3 = await doctor({ STORAGE_ENDPOINT: 'http://127.0.0.1:9' });
    expect(badS3.code).toBe(1);
    expect(statusOf(badS3)).toMatchObject({ s3: 'fail', postgres: 'ok', redis: 'ok' });
    expect(detailOf(badS3, 's3')).toContain('ECONNREFUSED');
    expectNoSecrets(badS3);

    const badDb = await doctor({ DATABASE_URL: `postgresql://t2i:${DB_PASSWORD}@127.0.0.1:9/t2i` });
    expect(statusOf(badDb).postgres).toBe('fail');
    expect(detailOf(badDb, 'postgres')).toMatch(/^postgresql:\/\/t2i:\*\*\*@127\.0\.0\.1:9\/t2i: .*127\.0\.0\.1:9/);
    expectNoSecrets(badDb);

    const invalid = await doctor({ PORT: 'eighty' }, ['--role', 'api']);
    expect(invalid.code).toBe(1);
    expect(invalid.checks.map((c) => c.name)).toEqual(['node', 'config']);
    expect(detailOf(invalid, 'config')).toContain('PORT: must be a whole number');
  });

  it('checks a model in S3 (MODEL_URI): its manifest, and whether the cache holds it yet', async () => {
    const uri = `s3://${env.STORAGE_BUCKET}/doctor-model/`;
    await run(process.execPath, [BIN, 'models', 'push', services.oracleModelDir, uri], { env: { ...process.env, ...env } });
    const cache = path.join(work, 'cache');
    const r = await doctor({ MODEL_DIR: '', MODEL_URI: uri, MODEL_CACHE_DIR: cache });
    expect(r.code, r.out).toBe(0);
    expect(detailOf(r, 'model')).toMatch(new RegExp(`^${uri}: \\d+ files, \\d+ bytes, pushed .*; not synced yet into ${cache}`));
    const missing = await doctor({ MODEL_DIR: '', MODEL_URI: `s3://${env.STORAGE_BUCKET}/nothing-here/`, MODEL_CACHE_DIR: cache });
    expect(missing.code).toBe(1);
    expect(detailOf(missing, 'model')).toContain(`s3://${env.STORAGE_BUCKET}/nothing-here/t2i-model-manifest.json: not found`);
  });
});
