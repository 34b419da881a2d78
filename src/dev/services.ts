/**
 * Real, throwaway backing services for tests, CI and the demo: PostgreSQL, Redis and
 * OpenStack Swift's S3 API (chosen over Node S3 emulators because it really checks SigV4
 * signatures, expiry and anonymous access, so presigned-URL tests mean something).
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
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  accessSync,
  appendFileSync,
  chmodSync,
  chownSync,
  closeSync,
  constants as fsConstants,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import * as Minio from 'minio';
import pg from 'pg';

export type ServiceName = 'postgres' | 'redis' | 's3';

export interface PostgresInfo {
  /** postgresql://postgres@127.0.0.1:PORT/postgres (trust auth, no password) */
  url: string;
  port: number;
  pid: number;
}

export interface RedisInfo {
  /** redis://127.0.0.1:PORT */
  url: string;
  port: number;
  pid: number;
}

export interface S3Info {
  /** http://127.0.0.1:PORT, path-style (give the minio client `pathStyle: true`) */
  endpoint: string;
  port: number;
  accessKey: string;
  secretKey: string;
  region: string;
  /** proxy, account, container and object server */
  pids: number[];
}

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

export type RestartableName = 'postgres' | 'redis';

export interface StartOptions {
  /** Folder for data and logs. Default: a new mkdtemp folder, removed by stop(). A given folder is kept. */
  dir?: string;
  log?: (msg: string) => void;
  only?: ServiceName[];
}

const INSTALL_HINT = 'run `sudo bash scripts/install-system-deps.sh` (Debian 12) to install it';
const STOP_TIMEOUT_MS = 5_000;
const READY_TIMEOUT_MS: Record<ServiceName, number> = { postgres: 30_000, redis: 10_000, s3: 60_000 };
/** Swift's S3 API only accepts SigV4 scoped to the region its s3api filter is configured with. */
const S3_REGION = 'us-east-1';

// ---------------------------------------------------------------------------------------------
// Small utilities

/** Asks the OS for a free TCP port on 127.0.0.1. Racy by nature (the port is free *now*), so
 * the starters below retry on "address in use". */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => {
        if (addr && typeof addr === 'object') resolve(addr.port);
        else reject(new Error('freePort: the OS returned no port for 127.0.0.1:0'));
      });
    });
  });
}

/** Creates an empty database (for per-test isolation) and returns its URL. */
export async function createDatabase(pgUrl: string, name: string): Promise<string> {
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(name)) {
    throw new Error(`createDatabase: "${name}" is not a plain identifier (letters, digits, _; at most 63 chars)`);
  }
  const client = new pg.Client({ connectionString: pgUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE "${name}"`);
  } finally {
    await client.end();
  }
  const url = new URL(pgUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Resolves true if `p` settled within `ms`, false otherwise; clears its timer either way so a
 * pending timeout does not hold the process open after stop(). */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true as const), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function tail(file: string, lines = 30): string {
  try {
    const all = readFileSync(file, 'utf8').trimEnd().split('\n');
    return all.slice(-lines).join('\n');
  } catch {
    return '(no log written)';
  }
}

function findExecutable(name: string, extraDirs: string[] = []): string | undefined {
  const dirs = [...extraDirs, ...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
  for (const d of dirs) {
    if (!d) continue;
    const p = join(d, name);
    try {
      accessSync(p, fsConstants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}

function requireExecutable(service: string, name: string, pkg: string, extraDirs: string[] = []): string {
  const p = findExecutable(name, extraDirs);
  if (!p) throw new Error(`${service}: \`${name}\` not found (Debian package ${pkg}); ${INSTALL_HINT}`);
  return p;
}

/** Newest /usr/lib/postgresql/N/bin (Debian keeps server binaries off PATH). */
function postgresBinDir(): string {
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root) ? readdirSync(root).filter((v) => /^\d+$/.test(v) && existsSync(join(root, v, 'bin', 'postgres'))) : [];
  versions.sort((a, b) => Number(b) - Number(a));
  if (!versions[0]) throw new Error(`postgres: no server binaries under ${root}/*/bin (Debian package postgresql-15); ${INSTALL_HINT}`);
  return join(root, versions[0], 'bin');
}

function lookupUser(name: string): { uid: number; gid: number } | undefined {
  for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const f = line.split(':');
    if (f[0] === name && f[2] && f[3]) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Processes

interface Managed {
  name: string;
  pid: number;
  child: ChildProcess;
  logFile: string;
  /** Postgres' SIGTERM is a "smart" shutdown that waits for clients to leave; SIGINT is fast. */
  stopSignal: NodeJS.Signals;
  exited: Promise<void>;
  hasExited: () => boolean;
}

interface SpawnSpec {
  name: string;
  cmd: string;
  args: string[];
  logFile: string;
  stopSignal?: NodeJS.Signals;
  uid?: number;
  gid?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** A short helper (initdb, ring builder) that start-up awaits: not handed to the watchdog. */
  oneShot?: boolean;
}

class Registry {
  readonly procs: Managed[] = [];
  /** Set once start-up is over: later spawns (restarts) are unref'd at once. */
  private unrefNew = false;
  constructor(private readonly pidFile: string) {}

  spawn(spec: SpawnSpec): Managed {
    // The log is opened here and inherited as stdout/stderr, so a service running as another
    // user (postgres) can write it without owning the folder.
    const fd = openSync(spec.logFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn(spec.cmd, spec.args, {
        detached: true, // own process group: stop() signals -pid and reaches its children
        stdio: ['ignore', fd, fd],
        uid: spec.uid,
        gid: spec.gid,
        env: spec.env ?? process.env,
        cwd: spec.cwd,
      });
    } finally {
      closeSync(fd);
    }
    if (child.pid === undefined) {
      throw new Error(`${spec.name}: could not spawn ${spec.cmd}`);
    }
    let done = false;
    const exited = new Promise<void>((resolve) => {
      child.once('exit', (code, signal) => {
        done = true;
        appendFileSync(spec.logFile, `\n[services] ${spec.name} exited (code ${code}, signal ${signal})\n`);
        resolve();
      });
      child.once('error', (err) => {
        done = true;
        appendFileSync(spec.logFile, `\n[services] ${spec.name} failed to spawn: ${err.message}\n`);
        resolve();
      });
    });
    const m: Managed = {
      name: spec.name,
      pid: child.pid,
      child,
      logFile: spec.logFile,
      stopSignal: spec.stopSignal ?? 'SIGTERM',
      exited,
      hasExited: () => done,
    };
    if (this.unrefNew) child.unref();
    this.procs.push(m);
    if (!spec.oneShot) appendFileSync(this.pidFile, `${m.pid} ${m.stopSignal}\n`);
    return m;
  }

  /** Once started, the services must not keep the event loop alive: a test run that forgets
   * stop() must still exit (the watchdog then cleans up). While starting they must, or Node
   * would exit in the middle of `await initdb.exited`. */
  unrefAll(): void {
    this.unrefNew = true;
    for (const p of this.procs) p.child.unref();
  }
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    try {
      process.kill(pid, signal); // not a group leader after all (should not happen)
    } catch {
      /* already gone */
    }
  }
}

async function terminate(m: Managed, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
  // A process that exited earlier (initdb, a failed server) is left alone: its PID, and so
  // its group id, may belong to someone else by now.
  if (m.hasExited()) return;
  killGroup(m.pid, m.stopSignal);
  if (!(await settlesWithin(m.exited, timeoutMs))) {
    killGroup(m.pid, 'SIGKILL');
    await settlesWithin(m.exited, 2_000);
  }
  // Sweep whatever the leader left behind in its group (e.g. a postgres backend).
  try {
    process.kill(-m.pid, 'SIGKILL');
  } catch {
    /* empty group: the normal case */
  }
}

/**
 * Polls `check` until it succeeds; fails fast with the log tail if a process of the service
 * exits, or after `timeoutMs`.
 */
async function waitReady(service: string, procs: Managed[], timeoutMs: number, check: () => Promise<void>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    const dead = procs.find((p) => p.hasExited());
    if (dead) {
      throw new Error(`${service}: ${dead.name} exited while starting. Log ${dead.logFile}:\n${tail(dead.logFile)}`);
    }
    try {
      await check();
      return;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > deadline) {
      const logs = procs.map((p) => `--- ${p.logFile}:\n${tail(p.logFile)}`).join('\n');
      throw new Error(`${service}: not ready after ${timeoutMs / 1000} s (last error: ${(lastErr as Error)?.message ?? lastErr}).\n${logs}`);
    }
    await sleep(100);
  }
}

const isPortClash = (err: unknown) => /address already in use|EADDRINUSE|could not bind|Errno 98/i.test(String((err as Error)?.message ?? err));

/** Runs a starter, retrying with new ports when a port taken since freePort() was the cause. */
async function withPortRetry<T>(registry: Registry, attempt: () => Promise<T>, tries = 3): Promise<T> {
  for (let i = 1; ; i++) {
    const before = registry.procs.length;
    try {
      return await attempt();
    } catch (err) {
      if (i >= tries || !isPortClash(err)) throw err;
      // Stop what this attempt started before trying again with fresh ports.
      await Promise.all(registry.procs.slice(before).map((p) => terminate(p, 2_000)));
    }
  }
}

/** A one-process service that can be stopped and started again on the same port and data. */
interface Restartable<I extends { port: number; pid: number }> {
  /** Mutable: `pid` follows restarts, so callers holding it see the current one. */
  info: I;
  stop(): Promise<void>;
  start(): Promise<void>;
}

async function restartable<I extends { port: number; pid: number }>(
  registry: Registry,
  launch: (port: number) => Promise<Managed>,
  describe: (port: number, pid: number) => I,
): Promise<Restartable<I>> {
  let current: Managed | undefined;
  const info = await withPortRetry(registry, async () => {
    const port = await freePort();
    current = await launch(port);
    return describe(port, current.pid);
  });
  return {
    info,
    stop: async () => {
      if (current) await terminate(current);
    },
    start: async () => {
      if (current && !current.hasExited()) return;
      current = await launch(info.port);
      info.pid = current.pid;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

async function startPostgres(dir: string, registry: Registry): Promise<Restartable<PostgresInfo>> {
  const bin = postgresBinDir();
  // Postgres refuses to run as root: run it as the `postgres` user that the Debian package creates.
  let owner: { uid: number; gid: number } | undefined;
  if (process.getuid?.() === 0) {
    owner = lookupUser('postgres');
    if (!owner) throw new Error(`postgres: running as root but there is no "postgres" user; ${INSTALL_HINT}`);
  }
  const home = join(dir, 'postgres');
  const data = join(home, 'data');
  mkdirSync(home, { recursive: true, mode: 0o700 });
  if (owner) chownSync(home, owner.uid, owner.gid);
  const logFile = join(dir, 'postgres.log');
  const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };

  const initdb = registry.spawn({
    name: 'initdb',
    cmd: join(bin, 'initdb'),
    args: ['-D', data, '-U', 'postgres', '-A', 'trust', '-E', 'UTF8', '--locale=C.UTF-8', '--no-sync', '--no-instructions'],
    logFile,
    uid: owner?.uid,
    gid: owner?.gid,
    env,
    cwd: home,
    oneShot: true,
  });
  await initdb.exited;
  if (initdb.child.exitCode !== 0) {
    const hint =
      owner && /Permission denied/.test(tail(logFile))
        ? ` The "postgres" user must be able to enter ${dir} and every folder above it (chmod o+x), or leave \`dir\` unset for a temp folder.`
        : '';
    throw new Error(`postgres: initdb failed (exit ${initdb.child.exitCode}).${hint} Log ${logFile}:\n${tail(logFile)}`);
  }

  const launch = async (port: number): Promise<Managed> => {
    const server = registry.spawn({
      name: 'postgres',
      cmd: join(bin, 'postgres'),
      args: [
        '-D',
        data,
        '-p',
        String(port),
        '-c',
        'listen_addresses=127.0.0.1',
        '-c',
        'unix_socket_directories=', // TCP only: no socket path-length limits or stale sockets
        '-c',
        'fsync=off', // throwaway data: durability only costs time
        '-c',
        'synchronous_commit=off',
        '-c',
        'full_page_writes=off',
        '-c',
        'max_connections=200', // per-test databases with their own pools add up
      ],
      logFile,
      stopSignal: 'SIGINT',
      uid: owner?.uid,
      gid: owner?.gid,
      env,
      cwd: home,
    });
    const url = pgUrl(port);
    await waitReady('postgres', [server], READY_TIMEOUT_MS.postgres, async () => {
      const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2_000 });
      client.on('error', () => {}); // a refused connection is expected while starting
      try {
        await client.connect();
        await client.query('SELECT 1');
      } finally {
        await client.end().catch(() => {});
      }
    });
    return server;
  };
  return restartable(registry, launch, (port, pid): PostgresInfo => ({ url: pgUrl(port), port, pid }));
}

const pgUrl = (port: number) => `postgresql://postgres@127.0.0.1:${port}/postgres`;

// ---------------------------------------------------------------------------------------------
// Redis

function redisPing(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: '127.0.0.1', port });
    let buf = '';
    const fail = (err: Error) => {
      sock.destroy();
      reject(err);
    };
    sock.setTimeout(2_000, () => fail(new Error('PING timed out')));
    sock.on('error', fail);
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString();
      if (!buf.includes('\r\n')) return;
      sock.end();
      if (buf.startsWith('+PONG')) resolve();
      else reject(new Error(`PING answered ${JSON.stringify(buf.trim())}`)); // e.g. -LOADING
    });
  });
}

async function startRedis(dir: string, registry: Registry): Promise<Restartable<RedisInfo>> {
  const cmd = requireExecutable('redis', 'redis-server', 'redis-server');
  const data = join(dir, 'redis');
  mkdirSync(data, { recursive: true });
  const logFile = join(dir, 'redis.log');
  const launch = async (port: number): Promise<Managed> => {
    const server = registry.spawn({
      name: 'redis-server',
      cmd,
      args: [
        '--port',
        String(port),
        '--bind',
        '127.0.0.1',
        '--dir',
        data,
        '--save',
        '', // no snapshots: throwaway data
        '--appendonly',
        'no',
        // BullMQ requires noeviction: an evicted job key silently loses work.
        '--maxmemory-policy',
        'noeviction',
        '--daemonize',
        'no', // keep the PID we spawned as the server's
      ],
      logFile,
    });
    await waitReady('redis', [server], READY_TIMEOUT_MS.redis, () => redisPing(port));
    return server;
  };
  return restartable(registry, launch, (port, pid): RedisInfo => ({ url: `redis://127.0.0.1:${port}`, port, pid }));
}

// ---------------------------------------------------------------------------------------------
// Swift with its S3 API

const SWIFT_SERVERS = ['account', 'container', 'object'] as const;

/** Builds the three one-replica rings in one Python run (swift-ring-builder would start nine). */
const RING_SCRIPT = `
import sys
from swift.common.ring import RingBuilder
swift_dir = sys.argv[1]
for arg in sys.argv[2:]:
    name, port = arg.split('=')
    b = RingBuilder(6, 1, 1)
    b.add_dev({'id': 0, 'region': 1, 'zone': 1, 'ip': '127.0.0.1', 'port': int(port),
               'device': 'd1', 'weight': 1})
    b.rebalance()
    b.get_ring().save('%s/%s.ring.gz' % (swift_dir, name))
`;

/**
 * Swift hands requests without S3 credentials to its own API, which answers an S3-style path
 * with 400 "Bad Request". AWS S3 (and MinIO) answer 403 AccessDenied for a private object, and
 * that is what the app and its tests should see, so this filter, placed before s3api, refuses
 * anonymous S3-style requests the way S3 does. Swift's own paths (/v1, /auth, /info,
 * /healthcheck) and any request that carries credentials pass through untouched.
 */
const ANON_DENY_PY = `
import uuid

SWIFT_PREFIXES = ('/v1/', '/auth/', '/info', '/healthcheck', '/crossdomain.xml')
S3_QUERY_AUTH = ('X-Amz-Signature=', 'X-Amz-Credential=', 'AWSAccessKeyId=', 'Signature=')


def filter_factory(global_conf, **local_conf):
    def deny_anonymous(app):
        def middleware(env, start_response):
            path = env.get('PATH_INFO', '')
            query = env.get('QUERY_STRING', '')
            has_auth = ('HTTP_AUTHORIZATION' in env or 'HTTP_X_AUTH_TOKEN' in env
                        or any(k in query for k in S3_QUERY_AUTH))
            if has_auth or path.startswith(SWIFT_PREFIXES):
                return app(env, start_response)
            body = ('<?xml version="1.0" encoding="UTF-8"?>\\n'
                    '<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
                    '<RequestId>%s</RequestId></Error>' % uuid.uuid4().hex).encode()
            start_response('403 Forbidden', [('Content-Type', 'application/xml'),
                                             ('Content-Length', str(len(body)))])
            return [body]
        return middleware
    return deny_anonymous
`;

function swiftConfigs(o: {
  swiftDir: string;
  devices: string;
  user: string;
  proxyPort: number;
  ports: Record<(typeof SWIFT_SERVERS)[number], number>;
  account: string;
  user_: string;
  secret: string;
}) {
  const common = (port: number) => `[DEFAULT]
bind_ip = 127.0.0.1
bind_port = ${port}
workers = 0
user = ${o.user}
swift_dir = ${o.swiftDir}
devices = ${o.devices}
mount_check = false
disable_fallocate = true
log_level = INFO
`;
  const files: Record<string, string> = {
    'swift.conf': `[swift-hash]
swift_hash_path_suffix = t2i-local
swift_hash_path_prefix = t2i-local

[storage-policy:0]
name = Policy-0
default = yes
`,
  };
  for (const s of SWIFT_SERVERS) {
    files[`${s}-server.conf`] = `${common(o.ports[s])}
[pipeline:main]
pipeline = healthcheck ${s}-server

[app:${s}-server]
use = egg:swift#${s}

[filter:healthcheck]
use = egg:swift#healthcheck
`;
  }
  files['proxy-server.conf'] = `${common(o.proxyPort)}
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk t2i_anon_deny s3api tempauth copy slo dlo versioned_writes proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:s3api]
use = egg:swift#s3api
location = ${S3_REGION}

[filter:tempauth]
use = egg:swift#tempauth
user_${o.account}_${o.user_} = ${o.secret} .admin

# No memcached is run. Port 1 refuses at once; the default (11211) could reach a developer's
# memcached and share cached account/container info between unrelated runs.
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:1

[filter:t2i_anon_deny]
paste.filter_factory = t2i_anon_deny:filter_factory
[filter:versioned_writes]
use = egg:swift#versioned_writes
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
`;
  return files;
}

async function httpOk(url: string): Promise<void> {
  const res = await fetch(url, { signal: AbortSignal.timeout(2_000) });
  await res.arrayBuffer();
  if (res.status !== 200) throw new Error(`GET ${url} answered ${res.status}`);
}

async function startSwift(dir: string, registry: Registry): Promise<S3Info> {
  // Swift's scripts start with #!/usr/bin/python3; use that python (not a pyenv/venv one).
  const python = '/usr/bin/python3';
  const bins = {
    proxy: requireExecutable('s3', 'swift-proxy-server', 'swift-proxy'),
    account: requireExecutable('s3', 'swift-account-server', 'swift-account'),
    container: requireExecutable('s3', 'swift-container-server', 'swift-container'),
    object: requireExecutable('s3', 'swift-object-server', 'swift-object'),
  };
  const home = join(dir, 's3');
  const swiftDir = join(home, 'etc');
  const devices = join(home, 'devices');
  mkdirSync(swiftDir, { recursive: true });
  mkdirSync(join(devices, 'd1'), { recursive: true });
  const pyDir = join(home, 'python');
  mkdirSync(pyDir, { recursive: true });
  // Python must not pick up a pyenv/venv's modules; only our filter module is added.
  const env: NodeJS.ProcessEnv = { ...process.env, PYTHONPATH: pyDir, PYTHONDONTWRITEBYTECODE: '1' };
  delete env.PYTHONHOME;

  const account = 'test';
  const user = 'tester';
  const secret = randomBytes(16).toString('hex');

  return withPortRetry(registry, async () => {
    const [proxyPort, accountPort, containerPort, objectPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
    const ports = { account: accountPort!, container: containerPort!, object: objectPort! };
    const files = swiftConfigs({ swiftDir, devices, user: userInfo().username, proxyPort: proxyPort!, ports, account, user_: user, secret });
    for (const [name, text] of Object.entries(files)) writeFileSync(join(swiftDir, name), text);
    writeFileSync(join(pyDir, 't2i_anon_deny.py'), ANON_DENY_PY);

    const ringLog = join(dir, 's3-rings.log');
    const rings = registry.spawn({
      name: 'swift rings',
      cmd: python,
      args: ['-c', RING_SCRIPT, swiftDir, ...SWIFT_SERVERS.map((s) => `${s}=${ports[s]}`)],
      logFile: ringLog,
      env,
      oneShot: true,
    });
    await rings.exited;
    if (rings.child.exitCode !== 0) {
      const hint = /No module named 'swift'/.test(tail(ringLog)) ? `; ${INSTALL_HINT}` : '';
      throw new Error(`s3: building Swift rings failed (exit ${rings.child.exitCode})${hint}. Log ${ringLog}:\n${tail(ringLog)}`);
    }

    const servers = (['proxy', ...SWIFT_SERVERS] as const).map((s) =>
      registry.spawn({
        name: `swift-${s}-server`,
        cmd: bins[s],
        args: [join(swiftDir, `${s}-server.conf`), '--verbose'], // --verbose: log to stderr (= our log file), not syslog
        logFile: join(dir, `s3-${s}.log`),
        env,
      }),
    );
    const health = [proxyPort!, accountPort!, containerPort!, objectPort!].map((p) => `http://127.0.0.1:${p}/healthcheck`);
    await waitReady('s3', servers, READY_TIMEOUT_MS.s3, async () => {
      await Promise.all(health.map(httpOk));
    });

    const info: S3Info = {
      endpoint: `http://127.0.0.1:${proxyPort}`,
      port: proxyPort!,
      accessKey: `${account}:${user}`,
      secretKey: secret,
      region: S3_REGION,
      pids: servers.map((s) => s.pid),
    };
    // Healthchecks do not exercise auth: one signed request proves s3api + tempauth + account server.
    const client = new Minio.Client({
      endPoint: '127.0.0.1',
      port: info.port,
      useSSL: false,
      accessKey: info.accessKey,
      secretKey: info.secretKey,
      region: info.region,
      pathStyle: true,
    });
    await waitReady('s3', servers, READY_TIMEOUT_MS.s3, async () => {
      await client.listBuckets();
    });
    return info;
  });
}

// ---------------------------------------------------------------------------------------------
// Watchdog

/**
 * Kills the service process groups and removes the folder if the Node process that started
 * them dies without calling stop(). A shell loop is enough: `kill -0` every second.
 */
const WATCHDOG = `
parent=$1; pidfile=$2; removedir=$3
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
if [ -f "$pidfile" ]; then
  while read -r pid sig; do kill -s "\${sig#SIG}" -- "-$pid" 2>/dev/null; done < "$pidfile"
  # Give them up to 5 s to shut down cleanly, then SIGKILL what is left.
  i=0
  while [ $i -lt 25 ]; do
    alive=0
    while read -r pid sig; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done < "$pidfile"
    [ $alive -eq 0 ] && break
    sleep 0.2; i=$((i + 1))
  done
  while read -r pid sig; do kill -s KILL -- "-$pid" 2>/dev/null; done < "$pidfile"
fi
if [ -n "$removedir" ]; then rm -rf "$removedir"; fi
`;

function startWatchdog(pidFile: string, removeDir: string): ChildProcess {
  const child = spawn('/bin/sh', ['-c', WATCHDOG, 'services-watchdog', String(process.pid), pidFile, removeDir], {
    detached: true,
    stdio: 'ignore',
  });
  child.unref();
  return child;
}

// ---------------------------------------------------------------------------------------------
// Public entry point

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
      () => startPostgres(dir, registry),
      (v) => v.info.url,
    ),
    timed(
      'redis',
      () => startRedis(dir, registry),
      (v) => v.info.url,
    ),
    timed(
      's3',
      () => startSwift(dir, registry),
      (v) => v.endpoint,
    ),
  ]);
  const failures = [pgRes, redisRes, s3Res].flatMap((r) => (r.status === 'rejected' ? [r.reason as Error] : []));
  if (failures.length > 0 || pgRes.status !== 'fulfilled' || redisRes.status !== 'fulfilled' || s3Res.status !== 'fulfilled') {
    await stop();
    const msg = failures.map((e) => e.message).join('\n\n');
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
