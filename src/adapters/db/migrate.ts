/**
 * Applies the SQL migrations in prisma/migrations without Prisma's schema engine.
 *
 * Why not `prisma migrate deploy`: Prisma 7's CLI needs a native schema-engine binary that it
 * downloads on first use, and this project must install and run offline. This runner does what
 * `migrate deploy` does and writes `_prisma_migrations` the same way, so the Prisma CLI, where it
 * is available, sees the database as up to date and can take over at any time:
 *
 *  - a session advisory lock (the same key, 72707369, Prisma uses) serialises concurrent runs,
 *    e.g. several replicas starting at once; Prisma gives up after 10 s, so do we;
 *  - `_prisma_migrations` is created with Prisma's own DDL; a non-empty database without it is
 *    refused (Prisma's P3005: it needs baselining, not blind DDL);
 *  - a row with finished_at and rolled_back_at both NULL is a failed migration: nothing more is
 *    applied until someone resolves it (Prisma's P3009);
 *  - each pending folder, in name order, gets a row (uuid id, sha256 hex checksum of
 *    migration.sql, started_at), then its migration.sql is sent as ONE simple-protocol query,
 *    which PostgreSQL runs in one implicit transaction: a failing script leaves no partial DDL.
 *    Success bumps applied_steps_count to 1 and sets finished_at; failure stores the error in
 *    logs (Prisma's P3018 text) and throws.
 *
 * Stricter than Prisma: an applied migration whose file changed since is refused (Prisma's
 * deploy ignores it), because the database would silently differ from what the repository says.
 */
import { createHash, randomUUID } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

/** Prisma's advisory lock key for Migrate ("a unique number we chose to identify Migrate"). */
export const PRISMA_MIGRATE_LOCK_KEY = 72707369;
const LOCK_TIMEOUT_MS = 10_000;
const LOCK_POLL_MS = 100;
const CONNECT_TIMEOUT_MS = 5_000;
const RESOLVE_HINT = 'See https://pris.ly/d/migrate-resolve';

/** Prisma's DDL for its bookkeeping table (schema-engine, postgres flavour), verbatim. */
const CREATE_MIGRATIONS_TABLE = `CREATE TABLE _prisma_migrations (
    id                      VARCHAR(36) PRIMARY KEY NOT NULL,
    checksum                VARCHAR(64) NOT NULL,
    finished_at             TIMESTAMPTZ,
    migration_name          VARCHAR(255) NOT NULL,
    logs                    TEXT,
    rolled_back_at          TIMESTAMPTZ,
    started_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_steps_count     INTEGER NOT NULL DEFAULT 0
);
`;

export interface MigrationFolder {
  /** Folder name, e.g. 20261128205053_init; also `migration_name` in `_prisma_migrations`. */
  name: string;
  sql: string;
  /** sha256 of migration.sql, lowercase hex: what Prisma stores as `checksum`. */
  checksum: string;
}

export interface ApplyOptions {
  /** Default: prisma/migrations of the project this module belongs to. */
  migrationsDir?: string;
  log?: (message: string) => void;
}

/** Thrown for every refusal or failure; `code` is Prisma's error code where one exists. */
export class MigrationError extends Error {
  constructor(
    message: string,
    readonly code: 'P3005' | 'P3009' | 'P3018' | 'P3019' | 'CHECKSUM_MISMATCH' | 'LOCK_TIMEOUT' | 'BAD_MIGRATIONS_DIR',
  ) {
    super(message);
    this.name = 'MigrationError';
  }
}

export function sha256Hex(text: string): string {
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

/** Walks up from this file to the folder holding prisma/migrations (works from src/ and dist/src/). */
export function defaultMigrationsDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, 'prisma', 'migrations');
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) {
      throw new MigrationError(`no prisma/migrations folder above ${fileURLToPath(import.meta.url)}; pass migrationsDir explicitly`, 'BAD_MIGRATIONS_DIR');
    }
    dir = parent;
  }
}

/** Reads the migration folders in the order Prisma applies them (lexicographic by name). */
export function readMigrations(migrationsDir: string): MigrationFolder[] {
  const dir = resolve(migrationsDir);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) {
    throw new MigrationError(`migrations folder ${dir} does not exist`, 'BAD_MIGRATIONS_DIR');
  }
  checkLockFile(dir);
  const names = readdirSync(dir, { withFileTypes: true })
    .filter((e) => e.isDirectory())
    .map((e) => e.name)
    .sort();
  return names.map((name) => {
    const file = join(dir, name, 'migration.sql');
    if (!existsSync(file)) {
      throw new MigrationError(`migration folder ${join(dir, name)} has no migration.sql; add it or remove the folder`, 'BAD_MIGRATIONS_DIR');
    }
    // Hash the exact file content, as Prisma does (no newline normalisation).
    const sql = readFileSync(file, 'utf8');
    return { name, sql, checksum: sha256Hex(sql) };
  });
}

/** Prisma refuses to apply a migrations folder made for another provider (P3019); so do we. */
function checkLockFile(dir: string): void {
  const lockFile = join(dir, 'migration_lock.toml');
  if (!existsSync(lockFile)) return;
  const provider = /^\s*provider\s*=\s*"([^"]*)"/m.exec(readFileSync(lockFile, 'utf8'))?.[1];
  if (provider !== undefined && provider !== 'postgresql') {
    throw new MigrationError(`${lockFile} says provider = "${provider}", but this runner only applies PostgreSQL migrations`, 'P3019');
  }
}

interface MigrationRow {
  id: string;
  checksum: string;
  migration_name: string;
  started_at: Date;
  finished_at: Date | null;
  rolled_back_at: Date | null;
}

export async function applyMigrations(databaseUrl: string, opts: ApplyOptions = {}): Promise<{ applied: string[] }> {
  const log = opts.log ?? (() => {});
  const migrations = readMigrations(opts.migrationsDir ?? defaultMigrationsDir());
  const { config, schema } = clientConfig(databaseUrl);
  const client = new pg.Client(config);
  // A dropped connection mid-run surfaces as a query error; without a listener an 'error' event
  // on an idle client would crash the process instead.
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (err) {
    throw new Error(`applyMigrations: cannot connect to ${redact(databaseUrl)}: ${errMessage(err)}. Is the database running and DATABASE_URL right?`, {
      cause: err,
    });
  }
  try {
    await acquireLock(client);
    try {
      // Prisma creates the schema named in ?schema= if it is missing; so do we.
      if (schema) {
        await client.query(`CREATE SCHEMA IF NOT EXISTS ${quoteIdent(schema)}`);
        await client.query(`SET search_path TO ${quoteIdent(schema)}`);
      }
      return await applyLocked(client, migrations, log);
    } finally {
      await client.query('SELECT pg_advisory_unlock($1)', [PRISMA_MIGRATE_LOCK_KEY]).catch(() => {});
    }
  } finally {
    await client.end().catch(() => {});
  }
}

async function applyLocked(client: pg.Client, migrations: MigrationFolder[], log: (m: string) => void): Promise<{ applied: string[] }> {
  await ensureMigrationsTable(client, log);

  const { rows } = await client.query<MigrationRow>(
    `SELECT id, checksum, migration_name, started_at, finished_at, rolled_back_at
       FROM _prisma_migrations ORDER BY started_at ASC`,
  );

  const failed = rows.filter((r) => r.finished_at === null && r.rolled_back_at === null);
  if (failed.length > 0) {
    const details = failed.map((r) => `The \`${r.migration_name}\` migration started at ${r.started_at.toISOString()} failed`).join('\n');
    throw new MigrationError(
      'migrate found failed migrations in the target database, new migrations will not be applied.\n' +
        `${details}\n` +
        'Fix the database by hand (the failed script ran in one transaction, so it left no changes unless it ' +
        'managed its own transactions), then mark the row resolved: `UPDATE _prisma_migrations SET rolled_back_at = now() ' +
        "WHERE migration_name = '<name>' AND finished_at IS NULL` (what `prisma migrate resolve --rolled-back <name>` does), " +
        `and run the migrations again. ${RESOLVE_HINT}`,
      'P3009',
    );
  }

  const applied = rows.filter((r) => r.finished_at !== null && r.rolled_back_at === null);
  const byName = new Map(migrations.map((m) => [m.name, m]));
  const changed = applied.filter((r) => {
    const m = byName.get(r.migration_name);
    return m !== undefined && m.checksum !== r.checksum;
  });
  if (changed.length > 0) {
    throw new MigrationError(
      `applied migration(s) were edited after they were applied: ${changed.map((r) => r.migration_name).join(', ')} ` +
        '(the sha256 of migration.sql differs from _prisma_migrations.checksum). The database does not contain what ' +
        'these files now say. Restore the original files (git checkout) and put the change in a new migration folder.',
      'CHECKSUM_MISMATCH',
    );
  }
  const known = new Set(migrations.map((m) => m.name));
  for (const r of applied) {
    if (!known.has(r.migration_name)) {
      log(`warning: migration ${r.migration_name} is recorded as applied but has no folder in the migrations directory`);
    }
  }

  const appliedNames = new Set(applied.map((r) => r.migration_name));
  const pending = migrations.filter((m) => !appliedNames.has(m.name));
  if (pending.length === 0) {
    log('no pending migrations');
    return { applied: [] };
  }

  const done: string[] = [];
  for (const m of pending) {
    log(`applying ${m.name}`);
    await applyOne(client, m);
    done.push(m.name);
  }
  log(`applied ${done.length} migration(s): ${done.join(', ')}`);
  return { applied: done };
}

async function applyOne(client: pg.Client, m: MigrationFolder): Promise<void> {
  const id = randomUUID();
  // The row goes in first, on its own, as Prisma does: if the process dies mid-script the row
  // stays unfinished and the next run stops at it instead of guessing.
  await client.query('INSERT INTO _prisma_migrations (id, checksum, started_at, migration_name) VALUES ($1, $2, $3, $4)', [id, m.checksum, new Date(), m.name]);
  try {
    // No parameters, so pg uses the simple query protocol: the whole file is one query, which
    // PostgreSQL runs as one implicit transaction (all statements or none).
    await client.query(m.sql);
  } catch (err) {
    const logs = failureLogs(m.name, err);
    await client.query('UPDATE _prisma_migrations SET logs = $2 WHERE id = $1', [id, logs]);
    throw new MigrationError(`migration ${m.name} failed and was rolled back; nothing else was applied.\n${logs}`, 'P3018');
  }
  await client.query(
    `UPDATE _prisma_migrations
        SET applied_steps_count = applied_steps_count + 1, finished_at = $2
      WHERE id = $1`,
    [id, new Date()],
  );
}

async function ensureMigrationsTable(client: pg.Client, log: (m: string) => void): Promise<void> {
  const { rows } = await client.query<{ exists: boolean }>("SELECT to_regclass('_prisma_migrations') IS NOT NULL AS exists");
  if (rows[0]?.exists) return;

  // Prisma's P3005: a database with objects but no migration history was created some other way;
  // replaying the history over it would fail halfway or, worse, half succeed.
  const { rows: objects } = await client.query<{ name: string }>(
    `SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
     UNION ALL
     SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
       WHERE n.nspname = current_schema() AND t.typtype = 'e'
     LIMIT 5`,
  );
  if (objects.length > 0) {
    throw new MigrationError(
      `the database schema is not empty (it has ${objects.map((o) => o.name).join(', ')}...) but has no ` +
        '_prisma_migrations table, so it was not created by these migrations. Baseline it ' +
        '(https://pris.ly/d/migrate-baseline) or point DATABASE_URL at an empty database.',
      'P3005',
    );
  }
  await client.query(CREATE_MIGRATIONS_TABLE);
  log('created _prisma_migrations');
}

async function acquireLock(client: pg.Client): Promise<void> {
  // Polling pg_try_advisory_lock instead of a blocking pg_advisory_lock + lock_timeout keeps the
  // session's lock_timeout untouched for the migration scripts.
  const deadline = Date.now() + LOCK_TIMEOUT_MS;
  for (;;) {
    const { rows } = await client.query<{ locked: boolean }>('SELECT pg_try_advisory_lock($1) AS locked', [PRISMA_MIGRATE_LOCK_KEY]);
    if (rows[0]?.locked) return;
    if (Date.now() >= deadline) {
      throw new MigrationError(
        `timed out after ${LOCK_TIMEOUT_MS / 1000} s waiting for the migration advisory lock ` +
          `(pg_advisory_lock(${PRISMA_MIGRATE_LOCK_KEY})): another migration run holds it. If none is running, ` +
          `find the holder with \`SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = ${PRISMA_MIGRATE_LOCK_KEY}\`.`,
        'LOCK_TIMEOUT',
      );
    }
    await new Promise((r) => setTimeout(r, LOCK_POLL_MS));
  }
}

/** Prisma's P3018 text, which is what `migrate deploy` stores in `logs`. */
function failureLogs(name: string, err: unknown): string {
  const e = err as { code?: string; message?: string; position?: string };
  return (
    'A migration failed to apply. New migrations cannot be applied before the error is recovered from. ' +
    `Read more about how to resolve migration issues in a production database: https://pris.ly/d/migrate-resolve\n\n` +
    `Migration name: ${name}\n\n` +
    `Database error code: ${e.code ?? 'unknown'}\n\n` +
    `Database error:\n${e.message ?? String(err)}` +
    (e.position ? `\n\nPosition: ${e.position}` : '')
  );
}

/**
 * pg does not know Prisma's `?schema=` URL parameter; take it out and, once connected, make it the
 * search_path so that `_prisma_migrations` and the migrated objects land in that schema, as with Prisma.
 */
function clientConfig(databaseUrl: string): { config: pg.ClientConfig; schema: string | null } {
  const url = new URL(databaseUrl);
  const schema = url.searchParams.get('schema');
  url.searchParams.delete('schema');
  const config: pg.ClientConfig = { connectionString: url.toString(), connectionTimeoutMillis: CONNECT_TIMEOUT_MS };
  return { config, schema };
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

function redact(databaseUrl: string): string {
  try {
    const url = new URL(databaseUrl);
    if (url.password) url.password = '***';
    return url.toString();
  } catch {
    return '(unparseable DATABASE_URL)';
  }
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
