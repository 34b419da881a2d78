import { createHash, randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { lstat, mkdir, open, readdir, readFile, rename, rm, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';

/**
 * Model exports served from an object store. `t2i models push DIR s3://…` uploads every file of
 * an export and then a manifest (path, size, sha256 of each file); a worker with MODEL_URI syncs
 * the export into a local cache folder at boot, verifies every size and checksum, and loads it
 * from there. The cache is keyed by the manifest's own checksum, so a new push is a new folder
 * and a second worker on the host, or a restart, finds the folder complete and downloads nothing.
 *
 * Invariants:
 * - A folder is used only once its `.t2i-complete` marker exists; the marker is written last
 *   (rename), after every file was verified, so a crash never leaves a folder that looks whole.
 * - One writer per folder at a time: a lock file whose mtime the holder refreshes; a lock not
 *   refreshed for `staleMs` belongs to a dead process (a SIGKILLed worker, another container)
 *   and is taken over.
 * - An interrupted download leaves `<file>.part`; the next sync hashes what is there and asks S3
 *   for the rest (a ranged GET). A file whose checksum does not match the manifest is deleted
 *   and refused, never renamed into place.
 */

export const MANIFEST_NAME = 't2i-model-manifest.json';
const MANIFEST_FORMAT = 't2i-model-export/1';
const COMPLETE_MARKER = '.t2i-complete';

/** The object side, implemented by src/adapters/model-store.ts; paths are relative to the export's prefix. */
export interface ModelStore {
  /** s3://bucket/prefix/ */
  readonly uri: string;
  /** The full address of one file, for messages. */
  describe(rel: string): string;
  /** A small object in full, or null if it does not exist. */
  readSmall(rel: string): Promise<Buffer | null>;
  /** A stream of an object from byte `offset` on. */
  read(rel: string, offset: number): Promise<Readable>;
  writeFile(rel: string, file: string, sha256: string): Promise<void>;
  writeSmall(rel: string, body: Buffer): Promise<void>;
  ensureBucket(): Promise<void>;
}

const relPath = z
  .string()
  .min(1)
  .refine((p) => !p.startsWith('/') && !p.split('/').some((s) => s === '' || s === '.' || s === '..'), 'must be a relative path without . or .. segments');

export const manifestSchema = z.object({
  format: z.literal(MANIFEST_FORMAT),
  created_at: z.string(),
  files: z.array(z.object({ path: relPath, size: z.number().int().min(0), sha256: z.string().regex(/^[0-9a-f]{64}$/) })).min(1),
});
export type Manifest = z.infer<typeof manifestSchema>;

export type Log = (level: 'info' | 'warn', msg: string, fields?: Record<string, unknown>) => void;

/** sha256 of a file, streamed. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(file), hash);
  return hash.digest('hex');
}

/** Every regular file under `dir`, as sorted posix paths relative to it. Symlinks are refused: an export must be self-contained. */
async function listFiles(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await readdir(path.join(dir, prefix))).sort()) {
    const rel = prefix ? `${prefix}/${name}` : name;
    const st = await lstat(path.join(dir, rel));
    if (st.isSymbolicLink()) throw new Error(`${path.join(dir, rel)}: a symbolic link; copy the file into the export instead`);
    if (st.isDirectory()) out.push(...(await listFiles(dir, rel)));
    else if (st.isFile() && !name.startsWith('.t2i-') && !name.endsWith('.part')) out.push(rel);
  }
  return out;
}

/** Uploads every file of `dir`, then the manifest: a reader never sees a manifest before the files it lists. */
export async function pushModel(store: ModelStore, dir: string, log: Log): Promise<{ manifest: Manifest; bytes: number }> {
  const root = path.resolve(dir);
  if (!existsSync(path.join(root, 'model_index.json'))) throw new Error(`${root}: no model_index.json here; expected a Stable Diffusion ONNX export`);
  await store.ensureBucket();
  const files: Manifest['files'] = [];
  for (const rel of await listFiles(root)) {
    const file = path.join(root, rel);
    const [size, sha256] = [(await stat(file)).size, await sha256File(file)];
    const started = performance.now();
    await store.writeFile(rel, file, sha256);
    log('info', 'uploaded', { file: store.describe(rel), bytes: size, ms: Math.round(performance.now() - started) });
    files.push({ path: rel, size, sha256 });
  }
  const manifest: Manifest = { format: MANIFEST_FORMAT, created_at: new Date().toISOString(), files };
  await store.writeSmall(MANIFEST_NAME, Buffer.from(`${JSON.stringify(manifest, null, 1)}\n`));
  return { manifest, bytes: files.reduce((a, f) => a + f.size, 0) };
}

export interface SyncOptions {
  log: Log;
  signal?: AbortSignal;
  /** How often the lock holder refreshes the lock (ms). */
  heartbeatMs?: number;
  /** A lock not refreshed for this long is taken over (ms). Must be well above heartbeatMs. */
  staleMs?: number;
  /** How often a waiting process looks at the lock and the marker again (ms). */
  pollMs?: number;
  /** Called as bytes of a file arrive (tests interrupt a download with it). */
  onProgress?: (rel: string, bytesInFile: number) => void;
}

export interface SyncResult {
  /** The model folder to load. */
  dir: string;
  /** Bytes fetched from the store by this call (0 when the cache was complete). */
  downloadedBytes: number;
  /** Bytes of partial downloads found and continued. */
  resumedBytes: number;
  /** complete: reused as it was; downloaded: this call fetched (part of) it; waited: another process filled it while this one waited. */
  outcome: 'complete' | 'downloaded' | 'waited';
  manifestSha256: string;
  totalBytes: number;
}

/** Reads and checks the manifest of an export. */
export async function readManifest(store: ModelStore): Promise<{ manifest: Manifest; raw: Buffer }> {
  const raw = await store.readSmall(MANIFEST_NAME);
  if (!raw) throw new Error(`${store.describe(MANIFEST_NAME)}: not found; upload the export with \`t2i models push DIR ${store.uri}\``);
  let json: unknown;
  try {
    json = JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw new Error(`${store.describe(MANIFEST_NAME)}: not valid JSON (${(err as Error).message})`, { cause: err });
  }
  const parsed = manifestSchema.safeParse(json);
  if (!parsed.success) {
    throw new Error(
      `${store.describe(MANIFEST_NAME)}: not a t2i model manifest: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
    );
  }
  return { manifest: parsed.data, raw };
}

/** Where a synced export lives: <cache>/<first 16 hex of the manifest's sha256>/<last folder of the prefix>. */
export function cachePaths(cacheRoot: string, storeUri: string, manifestSha256: string): { base: string; dir: string; lock: string; marker: string } {
  // The last folder of the prefix (the bucket's name for an export at the bucket's root): it
  // becomes the model's name in logs and metrics.
  const segments = storeUri
    .replace(/^s3:\/\//, '')
    .split('/')
    .filter(Boolean);
  const name = (segments.at(-1) ?? 'model').replace(/[^A-Za-z0-9._-]/g, '_');
  const base = path.join(path.resolve(cacheRoot), manifestSha256.slice(0, 16));
  return { base, dir: path.join(base, name), lock: `${base}.lock`, marker: path.join(base, COMPLETE_MARKER) };
}

/** Syncs the export behind `store` into `cacheRoot` and returns the folder to load. */
export async function syncModel(store: ModelStore, cacheRoot: string, opts: SyncOptions): Promise<SyncResult> {
  const { manifest, raw } = await readManifest(store);
  const manifestSha256 = createHash('sha256').update(raw).digest('hex');
  const p = cachePaths(cacheRoot, store.uri, manifestSha256);
  const totalBytes = manifest.files.reduce((a, f) => a + f.size, 0);
  const result = (outcome: SyncResult['outcome'], downloadedBytes = 0, resumedBytes = 0): SyncResult => ({
    dir: p.dir,
    downloadedBytes,
    resumedBytes,
    outcome,
    manifestSha256,
    totalBytes,
  });
  await mkdir(path.dirname(p.base), { recursive: true });

  if (await isComplete(p.marker, p.dir, manifest, manifestSha256)) return result('complete');
  const lock = await acquireLock(p.lock, opts, () => isComplete(p.marker, p.dir, manifest, manifestSha256));
  if (lock === 'completed-while-waiting') return result('waited');
  try {
    // Another process may have finished just before we took the lock.
    if (await isComplete(p.marker, p.dir, manifest, manifestSha256)) return result('waited');
    await mkdir(p.dir, { recursive: true });
    let downloadedBytes = 0;
    let resumedBytes = 0;
    for (const f of manifest.files) {
      opts.signal?.throwIfAborted();
      const r = await fetchFile(store, p.dir, f, opts);
      downloadedBytes += r.downloaded;
      resumedBytes += r.resumed;
    }
    const tmp = `${p.marker}.${randomUUID()}.tmp`;
    await writeFile(tmp, JSON.stringify({ manifest_sha256: manifestSha256, source: store.uri, synced_at: new Date().toISOString() }));
    await rename(tmp, p.marker);
    return result('downloaded', downloadedBytes, resumedBytes);
  } finally {
    await lock.release();
  }
}

/** The marker names this manifest and every file has its size (checksums were verified before the marker was written). */
async function isComplete(marker: string, dir: string, manifest: Manifest, sha: string): Promise<boolean> {
  try {
    const m = JSON.parse(await readFile(marker, 'utf8')) as { manifest_sha256?: unknown };
    if (m.manifest_sha256 !== sha) return false;
  } catch {
    return false;
  }
  for (const f of manifest.files) {
    const st = await stat(path.join(dir, f.path)).catch(() => undefined);
    if (!st || st.size !== f.size) {
      // Something changed the cache after it was completed: sync it again.
      await rm(marker, { force: true });
      return false;
    }
  }
  return true;
}

/** Downloads one file into place, continuing a `.part` left by an interrupted sync; refuses a checksum mismatch. */
async function fetchFile(store: ModelStore, dir: string, f: Manifest['files'][number], opts: SyncOptions): Promise<{ downloaded: number; resumed: number }> {
  const target = path.join(dir, ...f.path.split('/'));
  const part = `${target}.part`;
  await mkdir(path.dirname(target), { recursive: true });
  const existing = await stat(target).catch(() => undefined);
  if (existing?.size === f.size && (await sha256File(target)) === f.sha256) return { downloaded: 0, resumed: 0 };
  if (existing) await unlink(target);

  let offset = (await stat(part).catch(() => undefined))?.size ?? 0;
  if (offset > f.size) {
    opts.log('warn', 'partial download is larger than the file; starting it again', { file: store.describe(f.path), partBytes: offset, size: f.size });
    await unlink(part);
    offset = 0;
  }
  const hash = createHash('sha256');
  if (offset > 0) {
    // Hash what an earlier sync already wrote, then ask for the rest only.
    await pipeline(createReadStream(part, { end: offset - 1 }), new Transform({ transform: (c: Buffer, _e, cb) => (hash.update(c), cb()) }));
    opts.log('info', 'resuming an interrupted download', { file: store.describe(f.path), fromByte: offset, size: f.size });
  }
  let received = offset;
  if (offset < f.size) {
    const started = performance.now();
    const source = await store.read(f.path, offset);
    const counter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        received += chunk.length;
        // More bytes than the manifest says: stop before filling the disk.
        if (received > f.size) return cb(new Error(`${store.describe(f.path)}: the object is larger than the manifest's ${f.size} bytes`));
        opts.onProgress?.(f.path, received);
        cb(null, chunk);
      },
    });
    await pipeline(source, counter, createWriteStream(part, { flags: offset > 0 ? 'a' : 'w' }), opts.signal ? { signal: opts.signal } : {});
    opts.log('info', 'downloaded', { file: store.describe(f.path), bytes: received - offset, ms: Math.round(performance.now() - started) });
  }
  const digest = hash.digest('hex');
  if (received !== f.size || digest !== f.sha256) {
    await unlink(part).catch(() => undefined);
    throw new Error(
      `${store.describe(f.path)}: ${received !== f.size ? `${received} bytes, the manifest says ${f.size}` : `sha256 ${digest} does not match the manifest's ${f.sha256}`}; the object is corrupted or was replaced after \`t2i models push\`, so it is refused (push the export again)`,
    );
  }
  await rename(part, target);
  return { downloaded: received - offset, resumed: offset };
}

interface Lock {
  release(): Promise<void>;
}

/** Tokens of the locks this process holds now: a lock naming this host and pid but none of these was left by an earlier process with the same pid (a restarted container). */
const heldTokens = new Set<string>();

/**
 * Takes the lock file with O_EXCL, or waits while another process holds it and keeps it fresh.
 * Returns 'completed-while-waiting' when the other process finished the folder meanwhile.
 */
async function acquireLock(file: string, opts: SyncOptions, completed: () => Promise<boolean>): Promise<Lock | 'completed-while-waiting'> {
  const heartbeatMs = opts.heartbeatMs ?? 2_000;
  const staleMs = opts.staleMs ?? 20_000;
  const pollMs = opts.pollMs ?? 500;
  const token = randomUUID();
  let announced = false;
  for (;;) {
    opts.signal?.throwIfAborted();
    try {
      const fh = await open(file, 'wx');
      await fh.writeFile(JSON.stringify({ host: hostname(), pid: process.pid, token, at: new Date().toISOString() }));
      await fh.close();
      // Refresh the mtime so waiters can tell a live holder from a dead one. A failed refresh is
      // not fatal: at worst a waiter takes over and both write, and checksums still decide.
      const timer = setInterval(() => {
        const now = new Date();
        utimes(file, now, now).catch(() => undefined);
      }, heartbeatMs);
      timer.unref();
      heldTokens.add(token);
      return {
        async release() {
          clearInterval(timer);
          heldTokens.delete(token);
          // Remove only our own lock (a waiter may have judged it stale and taken it over).
          const holder = await readFile(file, 'utf8').catch(() => '');
          if (holder.includes(token)) await rm(file, { force: true });
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST')
        throw new Error(`model cache: cannot create the lock ${file}: ${(err as Error).message}`, { cause: err });
    }
    if (await completed()) return 'completed-while-waiting';
    const st = await stat(file).catch(() => undefined);
    const holder = st ? await readFile(file, 'utf8').catch(() => '') : '';
    const ownPast = holder.includes(`"host":${JSON.stringify(hostname())},"pid":${process.pid},`) && ![...heldTokens].some((t) => holder.includes(t));
    if (st && (Date.now() - st.mtimeMs > staleMs || ownPast)) {
      // Renamed away first, so two waiters cannot both delete a lock a third one just created.
      const aside = `${file}.stale.${token}`;
      if (
        await rename(file, aside).then(
          () => true,
          () => false,
        )
      ) {
        opts.log('warn', 'took over a stale model cache lock (its holder stopped refreshing it)', { lock: file, holder: holder.slice(0, 200) });
        await rm(aside, { force: true });
      }
      continue;
    }
    if (!announced) {
      opts.log('info', 'another process is syncing this model; waiting for it', { lock: file, holder: holder.slice(0, 200) });
      announced = true;
    }
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
