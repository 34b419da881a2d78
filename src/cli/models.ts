import { parseArgs } from 'node:util';
import { createModelStore } from '../adapters/model-store.js';
import { envSchema } from '../config.js';
import { pushModel, syncModel, type Log } from '../core/model-cache.js';
import { UsageError } from './engine-commands.js';

/**
 * `t2i models push DIR s3://bucket/prefix/` and `t2i models pull s3://bucket/prefix/ [--cache DIR]`:
 * the operator's side of MODEL_URI. Both read only the STORAGE_* variables (no database needed).
 */

const storageEnv = envSchema.pick({ STORAGE_ENDPOINT: true, STORAGE_ACCESS_KEY: true, STORAGE_SECRET_KEY: true, STORAGE_REGION: true, MODEL_CACHE_DIR: true });

function storeFor(uri: string) {
  const cleaned = Object.fromEntries(Object.entries(process.env).filter(([, v]) => v !== undefined && v.trim() !== ''));
  const parsed = storageEnv.safeParse(cleaned);
  if (!parsed.success) {
    // Names and rules only: values may be secrets.
    const issues = parsed.error.issues.map((i) => `  - ${i.path.join('.')}: ${cleaned[String(i.path[0])] === undefined ? 'required' : i.message}`);
    throw new UsageError(`invalid configuration:\n${issues.join('\n')}\nSet the S3 endpoint and credentials (see .env.example).`);
  }
  const env = parsed.data;
  let store;
  try {
    store = createModelStore(uri, {
      endpoint: env.STORAGE_ENDPOINT,
      accessKey: env.STORAGE_ACCESS_KEY,
      secretKey: env.STORAGE_SECRET_KEY,
      region: env.STORAGE_REGION,
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  return { store, cacheDir: env.MODEL_CACHE_DIR };
}

const log: Log = (level, msg, fields = {}) => process.stderr.write(`${level === 'warn' ? 'warning: ' : ''}${msg} ${JSON.stringify(fields)}\n`);

export async function modelsCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { cache: { type: 'string' } } });
  const [sub, ...rest] = positionals;
  if (sub === 'push' && rest.length === 2) {
    const [dir, uri] = rest as [string, string];
    const { store } = storeFor(uri);
    const started = performance.now();
    const { manifest, bytes } = await pushModel(store, dir, log);
    process.stdout.write(`pushed ${manifest.files.length} files, ${bytes} bytes, to ${store.uri} in ${((performance.now() - started) / 1000).toFixed(1)} s\n`);
    return;
  }
  if (sub === 'pull' && rest.length === 1) {
    const { store, cacheDir } = storeFor(rest[0]!);
    const r = await syncModel(store, values.cache ?? cacheDir, { log });
    process.stdout.write(`${r.dir}\n${r.outcome}: ${r.downloadedBytes} bytes downloaded (${r.resumedBytes} resumed) of ${r.totalBytes}\n`);
    return;
  }
  throw new UsageError('usage: t2i models push DIR s3://bucket/prefix/ | t2i models pull s3://bucket/prefix/ [--cache DIR]');
}
