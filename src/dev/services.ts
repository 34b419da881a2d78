/**
 * Real, throwaway backing services for tests, CI and the demo: PostgreSQL, Redis and
 * OpenStack Swift's S3 API. One module per service in src/dev/services/; this file starts them
 * together and is what importers use.
 *
 * Each service gets a free loopback port and its data in one temp folder; they start in
 * parallel and are each waited on until a real client request succeeds. Every process is
 * spawned in its own process group so stop() can take down its children too (postgres
 * backends), and a small shell watchdog kills the groups if the Node process dies without
 * calling stop() (a crashed or SIGKILLed test run), so no orphans keep ports or disk.
 *
 * stopService/startService take postgres or redis away and back on the same port, for tests of
 * what the app does when a backing service goes down.
 *
 * The programs come from Debian packages: run `scripts/install-system-deps.sh` once.
 */
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startPostgres, type PostgresInfo } from './services/postgres.js';
import { killGroup, Registry, terminate, type CommandWrapper, type Placement, type Restartable } from './services/process.js';
import { startRedis, type RedisInfo } from './services/redis.js';
import { startSwift, type S3Info } from './services/swift.js';
import { startWatchdog } from './services/watchdog.js';

export { createDatabase, type PostgresInfo } from './services/postgres.js';
export { freePort, type CommandWrapper } from './services/process.js';
export type { RedisInfo } from './services/redis.js';
export type { S3Info } from './services/swift.js';

export type ServiceName = 'postgres' | 'redis' | 's3';
export type RestartableName = 'postgres' | 'redis';

export interface LocalServices {
  dir: string;
  /** Throws if postgres was left out with `only`. */
  postgres: PostgresInfo;
  /** Throws if redis was left out with `only`. */
  redis: RedisInfo;
  /** Throws if s3 was left out with `only`. */
  s3: S3Info;
  /** Stops exactly the processes started here and removes the temp folder; idempotent. */
  stop(): Promise<void>;
  /**
   * Stops one service but keeps its port and data, to test what the app does when it goes away
   * (startService brings it back on the same port, so clients can reconnect). Only postgres and
   * redis; redis comes back empty, as after a crash, since it keeps no snapshot.
   */
  stopService(name: RestartableName): Promise<void>;
  startService(name: RestartableName): Promise<void>;
  restartService(name: RestartableName): Promise<void>;
}

export interface StartOptions {
  /** Folder for data and logs. Default: a new mkdtemp folder, removed by stop(). A given folder is kept. */
  dir?: string;
  log?: (msg: string) => void;
  only?: ServiceName[];
  /** The address the servers listen on and clients use. Default 127.0.0.1; another one is for a test's own network namespace. */
  host?: string;
  /** Runs each server through this, e.g. `ip netns exec NS ...` to put it in that namespace (with `host` its address there). */
  wrap?: CommandWrapper;
}

/**
 * The configuration variables (see src/config.ts) that point a t2i process at these services,
 * with its own bucket.
 */
export function servicesEnv(services: Pick<LocalServices, 'postgres' | 'redis' | 's3'>, bucket: string): Record<string, string> {
  return {
    DATABASE_URL: services.postgres.url,
    REDIS_URL: services.redis.url,
    STORAGE_ENDPOINT: services.s3.endpoint,
    STORAGE_ACCESS_KEY: services.s3.accessKey,
    STORAGE_SECRET_KEY: services.s3.secretKey,
    STORAGE_REGION: services.s3.region,
    STORAGE_BUCKET: bucket,
  };
}

export async function startServices(opts: StartOptions = {}): Promise<LocalServices> {
  const log = opts.log ?? (() => {});
  const placement: Placement = { host: opts.host ?? '127.0.0.1', ...(opts.wrap ? { wrap: opts.wrap } : {}) };
  const wanted = new Set<ServiceName>(opts.only ?? ['postgres', 'redis', 's3']);
  const owned = opts.dir === undefined;
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 't2i-services-'));
  mkdirSync(dir, { recursive: true });
  // mkdtemp makes 0700; the postgres user must be able to reach its subfolder.
  if (owned) chmodSync(dir, 0o755);

  const pidFile = join(dir, 'services.pids');
  writeFileSync(pidFile, '');
  const registry = new Registry(pidFile);
  const watchdog = startWatchdog(pidFile, owned ? dir : '');

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      await Promise.all(registry.procs.map((p) => terminate(p)));
      if (watchdog.pid !== undefined) killGroup(watchdog.pid, 'SIGKILL');
      if (owned) rmSync(dir, { recursive: true, force: true });
      log(`services stopped${owned ? `, removed ${dir}` : ''}`);
    })());

  /** Starts one service if it was asked for, logging how long it took (undefined otherwise). */
  const timed = async <T>(name: ServiceName, start: () => Promise<T>, describe: (v: T) => string): Promise<T | undefined> => {
    if (!wanted.has(name)) return undefined;
    const t0 = performance.now();
    const v = await start();
    log(`${name} ready: ${describe(v)} (${((performance.now() - t0) / 1000).toFixed(2)} s)`);
    return v;
  };

  const [pgRes, redisRes, s3Res] = await Promise.allSettled([
    timed(
      'postgres',
      () => startPostgres(dir, registry, placement),
      (v) => v.info.url,
    ),
    timed(
      'redis',
      () => startRedis(dir, registry, placement),
      (v) => v.info.url,
    ),
    timed(
      's3',
      () => startSwift(dir, registry, placement),
      (v) => v.endpoint,
    ),
  ]);
  if (pgRes.status !== 'fulfilled' || redisRes.status !== 'fulfilled' || s3Res.status !== 'fulfilled') {
    await stop();
    const msg = [pgRes, redisRes, s3Res]
      .flatMap((r) => (r.status === 'rejected' ? [r.reason instanceof Error ? r.reason.message : String(r.reason)] : []))
      .join('\n\n');
    throw new Error(`startServices failed${owned ? '' : ` (logs kept in ${dir})`}:\n${msg}`);
  }
  const handles: Partial<Record<RestartableName, Restartable<PostgresInfo> | Restartable<RedisInfo>>> = {
    postgres: pgRes.value,
    redis: redisRes.value,
  };
  const s3Info = s3Res.value;

  registry.unrefAll();
  const notStarted = (name: ServiceName): never => {
    throw new Error(`${name} was not started: startServices was called with only: [${[...wanted].join(', ')}]`);
  };
  const handle = (name: RestartableName) => {
    if (stopping) throw new Error(`${name}: the services were stopped with stop(); call startServices again`);
    return handles[name] ?? notStarted(name);
  };
  return {
    dir,
    get postgres() {
      return pgRes.value?.info ?? notStarted('postgres');
    },
    get redis() {
      return redisRes.value?.info ?? notStarted('redis');
    },
    get s3() {
      return s3Info ?? notStarted('s3');
    },
    stop,
    stopService: (name) => handle(name).stop(),
    startService: (name) => handle(name).start(),
    restartService: async (name) => {
      await handle(name).stop();
      await handle(name).start();
    },
  };
}
