/**
 * The one place that builds a PrismaClient: the generated client (src/generated/prisma, made by
 * `npm run db:generate`, which runs on install) over node-postgres through @prisma/adapter-pg,
 * Prisma 7's way to talk to PostgreSQL without a native query engine.
 *
 * Timeouts are set so that a database that is down or unreachable makes calls fail within
 * seconds (and /health say so) instead of piling up requests that hang on a socket.
 */
import { PrismaPg } from '@prisma/adapter-pg';
import pg from 'pg';
import { PrismaClient } from '../../generated/prisma/client.js';

export type { GeneratedImage } from '../../generated/prisma/client.js';

/** The database handle the rest of the app takes (pass it in; tests give their own). */
export type Db = PrismaClient;

export type DbLogLevel = 'info' | 'warn' | 'error';

export interface DbClientOptions {
  /** Most connections this process opens (node-postgres pool size). Default 10. */
  poolMax?: number;
  /** Gives up opening a connection after this long. Default 2000 ms. */
  connectionTimeoutMillis?: number;
  /**
   * Longest a single statement may run: enforced by the server (statement_timeout) and by the
   * client (query_timeout, which also catches a server that stopped answering). Default 10000 ms.
   */
  queryTimeoutMillis?: number;
  /** Receives Prisma's warnings and errors and errors of idle pooled connections. Default: none. */
  log?: (level: DbLogLevel, message: string) => void;
}

export function createPrismaClient(databaseUrl: string, opts: DbClientOptions = {}): Db {
  const queryTimeout = opts.queryTimeoutMillis ?? 10_000;
  const { connectionString, schema } = splitSchemaParam(databaseUrl);
  const poolConfig: pg.PoolConfig = {
    connectionString,
    max: opts.poolMax ?? 10,
    connectionTimeoutMillis: opts.connectionTimeoutMillis ?? 2_000,
    statement_timeout: queryTimeout,
    // A little more than the server's limit so the server's clearer error normally wins.
    query_timeout: queryTimeout + 1_000,
    idleTimeoutMillis: 30_000,
    keepAlive: true,
  };
  const log = opts.log;
  // One pool for Prisma and for the few hot statements written in SQL (sqlPool): the pool size
  // is one budget for both.
  const pool = new pg.Pool(poolConfig);
  // An idle connection the server ends (a restart, a failover, a shutdown racing ours) is an
  // 'error' event on the pool: listened to from the start, so it can never crash the process.
  // PrismaPg listens too, but only from Prisma's first query; the SQL on this pool (sqlPool) may
  // come first, and may be all a process runs.
  pool.on('error', (err) => log?.('error', `idle database connection failed: ${err.message}`));
  const adapter = new PrismaPg(pool, {
    ...(schema ? { schema } : {}),
    // Ours, but ended with the client, so $disconnect() still releases every connection.
    disposeExternalPool: true,
  });
  if (!log) return withPool(new PrismaClient({ adapter }), pool, schema);

  const client = new PrismaClient({
    adapter,
    log: [
      { level: 'warn', emit: 'event' },
      { level: 'error', emit: 'event' },
      { level: 'info', emit: 'event' },
    ],
  });
  client.$on('warn', (e) => log('warn', e.message));
  client.$on('error', (e) => log('error', e.message));
  client.$on('info', (e) => log('info', e.message));
  // The log-typed client has the same API; Db is the plain type so callers need not care.
  return withPool(client, pool, schema);
}

const pools = new WeakMap<Db, pg.Pool>();

function withPool(db: Db, pool: pg.Pool, schema: string | undefined): Db {
  // node-postgres knows no schema parameter: set the search path on each new connection, as the adapter does for its queries.
  if (schema) pool.on('connect', (c) => void c.query(`SET search_path TO "${schema.replaceAll('"', '""')}"`).catch(() => undefined));
  pools.set(db, pool);
  return db;
}

/**
 * The node-postgres pool under a client made by createPrismaClient, for the hot statements that
 * are worth writing in SQL (one round trip, no query compiler): the same connections, the same
 * timeouts.
 */
export function sqlPool(db: Db): pg.Pool {
  const pool = pools.get(db);
  if (!pool) throw new Error('sqlPool: this client was not made by createPrismaClient');
  return pool;
}

/**
 * Prisma URLs may carry `?schema=name`; node-postgres does not understand it, the adapter takes it
 * as an option instead.
 */
function splitSchemaParam(databaseUrl: string): { connectionString: string; schema?: string } {
  let url: URL;
  try {
    url = new URL(databaseUrl);
  } catch {
    throw new Error('createPrismaClient: the database URL is not a valid URL (expected postgresql://user:pass@host:port/db)');
  }
  const schema = url.searchParams.get('schema') ?? undefined;
  url.searchParams.delete('schema');
  return schema ? { connectionString: url.toString(), schema } : { connectionString: databaseUrl };
}
