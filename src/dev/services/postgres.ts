/**
 * A throwaway PostgreSQL cluster: initdb in the services folder, then one server on a loopback
 * port with durability turned off (the data is thrown away anyway). Run as the `postgres` user
 * when we are root, because Postgres refuses to run as root.
 */
import { appendFileSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import {
  INSTALL_HINT,
  isLoopback,
  restartable,
  serverCommand,
  tail,
  waitReady,
  type Managed,
  type Placement,
  type Registry,
  type Restartable,
} from './process.js';

export interface PostgresInfo {
  /** postgresql://postgres@HOST:PORT/postgres (trust auth, no password; HOST is 127.0.0.1 by default) */
  url: string;
  port: number;
  pid: number;
}

/** Postgres takes 1.5-2 s to start here; a loaded machine may need much longer. */
const READY_TIMEOUT_MS = 30_000;

const pgUrl = (host: string, port: number) => `postgresql://postgres@${host}:${port}/postgres`;

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

export async function startPostgres(dir: string, registry: Registry, placement: Placement): Promise<Restartable<PostgresInfo>> {
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
  // initdb's trust rules cover loopback only. A cluster on another address (a test's own network
  // namespace) is reached from the test runner's address: trust every address, as this
  // throwaway cluster listens on nothing but that private address.
  if (!isLoopback(placement.host)) appendFileSync(join(data, 'pg_hba.conf'), '\nhost all all 0.0.0.0/0 trust\n');

  const launch = async (port: number): Promise<Managed> => {
    const command = serverCommand(
      placement,
      join(bin, 'postgres'),
      [
        '-D',
        data,
        '-p',
        String(port),
        '-c',
        `listen_addresses=${placement.host}`,
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
      owner,
    );
    const server = registry.spawn({ name: 'postgres', ...command, logFile, stopSignal: 'SIGINT', env, cwd: home });
    const url = pgUrl(placement.host, port);
    await waitReady('postgres', [server], READY_TIMEOUT_MS, async () => {
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
  return restartable(registry, launch, (port, pid): PostgresInfo => ({ url: pgUrl(placement.host, port), port, pid }));
}
