import { existsSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createPrismaClient } from '../adapters/db/client.js';
import { checkLibraries, findLibrary, sharedObjectsIn } from '../adapters/elf.js';
import { createImagesRepo } from '../adapters/images-repo.js';
import { createModelStore } from '../adapters/model-store.js';
import { checkRedis } from '../adapters/queue.js';
import { createStorage } from '../adapters/storage.js';
import { ConfigError, loadConfig, type Config } from '../config.js';
import { withTimeout } from '../core/lifecycle.js';
import { cachePaths, readManifest } from '../core/model-cache.js';
import { storageOptions } from '../core/wiring.js';
import { inspectModel } from '../engine/model-inspect.js';
import { availableProviders, bindingDir, CUDA_PROVIDER_LIBRARY, runtimeInfo } from '../engine/onnx/runtime.js';
import { missingMessage } from './check-libs.js';
import { UsageError } from './engine-commands.js';
import { createHash } from 'node:crypto';

/**
 * `t2i doctor [--role worker|api] [--json]`: what an operator runs inside an image or on a host
 * before trusting it. Reports Node and onnxruntime, the execution providers the binding offers
 * (for CUDA, whether every library it links resolves here, and whether a GPU driver is mounted),
 * the model (MODEL_DIR inspected, or MODEL_URI's manifest and cache), and Postgres, Redis and S3
 * with the configured settings. Exits 1 on any failed check. Secrets are never printed: URLs are
 * shown without passwords and every configured secret is masked in every message.
 */

export type Status = 'ok' | 'warn' | 'fail' | 'skip';
export interface Check {
  name: string;
  status: Status;
  detail: string;
}

const SERVICE_TIMEOUT_MS = 5_000;

export async function doctorCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { role: { type: 'string', default: 'worker' }, json: { type: 'boolean', default: false } } });
  if (values.role !== 'worker' && values.role !== 'api') throw new UsageError(`--role must be worker or api, got "${values.role}"`);
  const checks = await runDoctor(process.env, values.role);
  process.stdout.write(values.json ? `${JSON.stringify({ ok: !checks.some((c) => c.status === 'fail'), checks }, null, 1)}\n` : formatChecks(checks));
  const failed = checks.filter((c) => c.status === 'fail');
  if (failed.length > 0) throw new UsageError(`${failed.length} problem${failed.length === 1 ? '' : 's'}: ${failed.map((c) => c.name).join(', ')}`);
}

export function formatChecks(checks: Check[]): string {
  return checks.map((c) => `${c.status.padEnd(5)} ${c.name.padEnd(12)} ${c.detail.split('\n').join(`\n${' '.repeat(19)}`)}`).join('\n') + '\n';
}

export async function runDoctor(env: NodeJS.ProcessEnv, role: 'worker' | 'api'): Promise<Check[]> {
  const checks: Check[] = [];
  const add = (name: string, status: Status, detail: string) => checks.push({ name, status, detail });
  add('node', 'ok', `${process.version} (${process.platform} ${process.arch})`);

  let config: Config | undefined;
  try {
    config = loadConfig(env, role);
    add('config', 'ok', `${role} configuration is valid`);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    add('config', 'fail', err.message);
  }

  if (role === 'worker') {
    checks.push(...providerChecks(config?.EXECUTION_PROVIDER ?? 'auto'));
    if (config) checks.push(await modelCheck(config));
  }
  if (config) checks.push(...(await serviceChecks(config)));
  const secrets = config ? secretsOf(config) : [];
  return checks.map((c) => ({ ...c, detail: mask(c.detail, secrets) }));
}

function providerChecks(wanted: Config['EXECUTION_PROVIDER']): Check[] {
  const out: Check[] = [];
  let offered: string[];
  try {
    const info = runtimeInfo();
    offered = availableProviders();
    out.push({
      name: 'onnxruntime',
      status: 'ok',
      detail: `onnxruntime-node ${info.version}; built with ${info.backends.map((b) => `${b.name}${b.bundled ? '' : ' (separate library)'}`).join(', ')}; usable here: ${offered.join(', ')}`,
    });
  } catch (err) {
    out.push({ name: 'onnxruntime', status: 'fail', detail: `the onnxruntime-node binding does not load: ${(err as Error).message}` });
    return out;
  }
  const dir = bindingDir();
  const libs = dir ? sharedObjectsIn(dir) : [];
  if (!libs.some((f) => path.basename(f) === CUDA_PROVIDER_LIBRARY)) {
    const detail = `${CUDA_PROVIDER_LIBRARY} is not installed beside the binding${dir ? ` (${dir})` : ''}: a CPU image, or onnxruntime-node's install script was skipped`;
    out.push({ name: 'cuda', status: wanted === 'cuda' ? 'fail' : 'skip', detail: wanted === 'cuda' ? `EXECUTION_PROVIDER=cuda, but ${detail}` : detail });
  } else {
    const check = checkLibraries(libs, { preloaded: new Map(libs.map((f) => [path.basename(f), f])) });
    const problems: string[] = [];
    if (check.missing.length > 0) problems.push(missingMessage(check.missing));
    // The driver's library is mounted by the NVIDIA Container Toolkit only when the container gets a GPU.
    const driver = findLibrary('libcuda.so.1');
    if (!driver)
      problems.push(
        'no NVIDIA driver library (libcuda.so.1) here: start the container with a GPU (docker --gpus, compose device reservation, Kubernetes nvidia.com/gpu)',
      );
    const ok = `${check.objects.length} shared objects resolve${driver ? `; driver library ${driver}` : ''}`;
    out.push({
      name: 'cuda',
      status: problems.length === 0 ? 'ok' : wanted === 'cuda' ? 'fail' : wanted === 'auto' ? 'warn' : 'skip',
      detail: problems.length === 0 ? ok : `${problems.join('; ')}${wanted === 'auto' ? ' (EXECUTION_PROVIDER=auto will fall back to the CPU)' : ''}`,
    });
  }
  if (wanted !== 'auto' && wanted !== 'cuda' && !offered.includes(wanted)) {
    out.push({ name: 'provider', status: 'fail', detail: `EXECUTION_PROVIDER=${wanted} is not available here; available: ${offered.join(', ')}` });
  }
  return out;
}

async function modelCheck(config: Config): Promise<Check> {
  if (config.MODEL_URI) {
    try {
      const store = createModelStore(config.MODEL_URI, storeOptions(config));
      const { manifest, raw } = await withTimeout(readManifest(store), SERVICE_TIMEOUT_MS, 'reading the model manifest');
      const bytes = manifest.files.reduce((a, f) => a + f.size, 0);
      const p = cachePaths(config.MODEL_CACHE_DIR, store.uri, createHash('sha256').update(raw).digest('hex'));
      const cached = existsSync(p.marker)
        ? `synced in ${p.dir}`
        : `not synced yet into ${path.resolve(config.MODEL_CACHE_DIR)} (the worker downloads it at boot)`;
      return { name: 'model', status: 'ok', detail: `${store.uri}: ${manifest.files.length} files, ${bytes} bytes, pushed ${manifest.created_at}; ${cached}` };
    } catch (err) {
      return { name: 'model', status: 'fail', detail: (err as Error).message };
    }
  }
  const report = await inspectModel(config.MODEL_DIR!);
  if (report.problems.length > 0)
    return { name: 'model', status: 'fail', detail: `MODEL_DIR ${report.dir} is not a usable model:\n${report.problems.join('\n')}` };
  return { name: 'model', status: 'ok', detail: `${report.dir}: ${report.variant}; ${report.totalBytes} bytes` };
}

async function serviceChecks(config: Config): Promise<Check[]> {
  const run = async (name: string, target: string, probe: () => Promise<string | void>): Promise<Check> => {
    try {
      const note = await withTimeout(probe(), SERVICE_TIMEOUT_MS, `reaching ${name}`);
      return { name, status: 'ok', detail: `${target} reachable${note ? `; ${note}` : ''}` };
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      if (code === 'NoSuchBucket') return { name, status: 'warn', detail: `${target} reachable; ${(err as Error).message}` };
      return { name, status: 'fail', detail: `${target}: ${describeError(err)}` };
    }
  };
  return Promise.all([
    run('postgres', safeUrl(config.DATABASE_URL), async () => {
      const db = createPrismaClient(config.DATABASE_URL, { poolMax: 1 });
      try {
        await createImagesRepo(db).ping();
      } finally {
        await db.$disconnect().catch(() => undefined);
      }
    }),
    run('redis', safeUrl(config.REDIS_URL), async () => {
      await checkRedis(config.REDIS_URL);
      return 'maxmemory-policy noeviction';
    }),
    run('s3', `${config.STORAGE_ENDPOINT} bucket ${config.STORAGE_BUCKET}`, () => createStorage(storageOptions(config)).ping()),
  ]);
}

/**
 * An error and its causes, for an operator: adapters turn driver errors into public messages
 * ("The database is unavailable") and keep the driver's reason as the cause, which is what a
 * doctor must show. Prisma's call-site lines are dropped; secrets are masked by the caller.
 */
function describeError(err: unknown): string {
  const parts: string[] = [];
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    const text = e.message
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('Invalid `prisma'))
      .join(' ');
    if (text && !parts.some((p) => p.includes(text))) parts.push(text);
  }
  return parts.join(': ') || String(err);
}

function storeOptions(config: Config) {
  return { endpoint: config.STORAGE_ENDPOINT, accessKey: config.STORAGE_ACCESS_KEY, secretKey: config.STORAGE_SECRET_KEY, region: config.STORAGE_REGION };
}

/** A URL with its password replaced by ***. */
function safeUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparsable URL)';
  }
}

/** Every configured value that must never be printed, in the forms it may appear in. */
function secretsOf(config: Config): string[] {
  const out = [config.STORAGE_SECRET_KEY, config.STORAGE_ACCESS_KEY, config.METRICS_TOKEN ?? ''];
  for (const url of [config.DATABASE_URL, config.REDIS_URL, config.SENTRY_DSN ?? '']) {
    try {
      const u = new URL(url);
      out.push(u.password, decodeURIComponent(u.password));
      if (url === config.SENTRY_DSN) out.push(u.username);
    } catch {
      // not a URL: nothing to take from it
    }
  }
  return out.filter((s) => s.length >= 4);
}

function mask(text: string, secrets: string[]): string {
  let out = text;
  for (const s of secrets) out = out.split(s).join('***');
  return out;
}
