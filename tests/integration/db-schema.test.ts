/**
 * The database layer against a real PostgreSQL 15: the offline migration runner, the shape of
 * the bookkeeping it writes, the drift check (migrated database == prisma/schema.prisma), the
 * generated client over @prisma/adapter-pg, and the failure / refusal paths.
 *
 * The drift check (tests/support/prisma-schema.ts) reads schema.prisma itself and compares it with
 * pg_catalog, because Prisma's own needs the native schema engine, which cannot be downloaded
 * here. Needs the system packages: `sudo bash scripts/install-system-deps.sh`.
 */
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, sqlPool, type Db } from '../../src/adapters/db/client.js';
import { applyMigrations, MigrationError, readMigrations, sha256Hex } from '../../src/adapters/db/migrate.js';
import { createDatabase, startServices, type LocalServices } from '../../src/dev/services.js';
import { describeDatabase, describeExpected, driftReport, parseSchema } from '../support/prisma-schema.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SCHEMA_FILE = join(ROOT, 'prisma', 'schema.prisma');
const MIGRATIONS_DIR = join(ROOT, 'prisma', 'migrations');

// ---------------------------------------------------------------------------------------------

/** A row of _prisma_migrations as pg returns it (timestamptz as Date). */
interface MigrationRow {
  id: string;
  checksum: string;
  finished_at: Date | null;
  migration_name: string;
  logs: string | null;
  rolled_back_at: Date | null;
  started_at: Date;
  applied_steps_count: number;
}

let svc: LocalServices;
let dbCounter = 0;
const freshDb = () => createDatabase(svc.postgres.url, `dbschema_${process.pid}_${++dbCounter}`);

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A copy of the real migrations in a temp folder, to add or edit migrations without touching the repo. */
function tempMigrations(): string {
  const dir = mkdtempSync(join(tmpdir(), 't2i-migrations-'));
  cpSync(MIGRATIONS_DIR, dir, { recursive: true });
  tempDirs.push(dir);
  return dir;
}
const tempDirs: string[] = [];

beforeAll(async () => {
  svc = await startServices({ only: ['postgres'] });
});

afterAll(async () => {
  await svc?.stop();
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

describe('applyMigrations', () => {
  it('applies the init migration to a fresh database, then nothing on a second run', async () => {
    const url = await freshDb();
    const names = readMigrations(MIGRATIONS_DIR).map((m) => m.name);
    expect(names.length).toBeGreaterThan(0);
    expect(names[0]).toMatch(/^\d{14}_init$/);

    const logs: string[] = [];
    expect(await applyMigrations(url, { log: (m) => logs.push(m) })).toEqual({ applied: names });
    expect(logs).toContain('created _prisma_migrations');
    expect(await applyMigrations(url)).toEqual({ applied: [] });
  });

  it('writes _prisma_migrations rows the way prisma migrate deploy does', async () => {
    const url = await freshDb();
    const t0 = Date.now();
    await applyMigrations(url);
    await withClient(url, async (c) => {
      // The table itself: Prisma's column types and nullability.
      const cols = await c.query<{ column_name: string; data_type: string; is_nullable: string; len: number | null }>(
        `SELECT column_name, data_type, is_nullable, character_maximum_length AS len FROM information_schema.columns
          WHERE table_name = '_prisma_migrations' ORDER BY ordinal_position`,
      );
      expect(cols.rows.map((r) => `${r.column_name} ${r.data_type}${r.len ? `(${r.len})` : ''} ${r.is_nullable}`)).toEqual([
        'id character varying(36) NO',
        'checksum character varying(64) NO',
        'finished_at timestamp with time zone YES',
        'migration_name character varying(255) NO',
        'logs text YES',
        'rolled_back_at timestamp with time zone YES',
        'started_at timestamp with time zone NO',
        'applied_steps_count integer NO',
      ]);

      const { rows } = await c.query<MigrationRow>('SELECT * FROM _prisma_migrations ORDER BY started_at');
      const files = readMigrations(MIGRATIONS_DIR);
      expect(rows).toHaveLength(files.length);
      for (const [i, row] of rows.entries()) {
        const file = files[i]!;
        expect(row.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
        expect(row.migration_name).toBe(file.name);
        expect(row.checksum).toBe(sha256Hex(readFileSync(join(MIGRATIONS_DIR, file.name, 'migration.sql'), 'utf8')));
        expect(row.checksum).toMatch(/^[0-9a-f]{64}$/);
        expect(row.logs).toBeNull();
        expect(row.rolled_back_at).toBeNull();
        expect(row.applied_steps_count).toBe(1);
        expect(row.finished_at).toBeInstanceOf(Date);
        expect(row.started_at.getTime()).toBeGreaterThanOrEqual(t0 - 1000);
        expect(row.finished_at?.getTime()).toBeGreaterThanOrEqual(row.started_at.getTime());
      }
    });
  });

  it('produces a database that matches schema.prisma (drift check)', async () => {
    const url = await freshDb();
    await applyMigrations(url);
    const expected = describeExpected(parseSchema(readFileSync(SCHEMA_FILE, 'utf8')));
    const actual = await withClient(url, describeDatabase);
    // Guard against a parser that silently finds nothing.
    expect(expected).toContain('table generated_images');
    expect(expected).toContain('enum job_status (queued, running, succeeded, failed, canceled)');
    const report = driftReport(expected, actual);
    expect(report, `migrated database differs from prisma/schema.prisma:\n${report}\n`).toBe('');
  });

  it('the drift check notices a schema that differs from the database (negative control)', async () => {
    const url = await freshDb();
    await applyMigrations(url);
    const altered = readFileSync(SCHEMA_FILE, 'utf8')
      .replace('@db.VarChar(255)', '@db.VarChar(200)')
      .replace('progress          Int       @default(0)', 'progress          Int?')
      .replace('canceled\n', 'canceled\n  expired\n')
      .replace('@@index([status, updatedAt])', '@@index([status, updatedAt(sort: Desc)])');
    const report = driftReport(describeExpected(parseSchema(altered)), await withClient(url, describeDatabase));
    expect(report.split('\n').sort()).toEqual([
      '+ database:      column generated_images.file_name character varying(255) NULL DEFAULT -',
      '+ database:      column generated_images.progress integer NOT NULL DEFAULT 0',
      '+ database:      enum job_status (queued, running, succeeded, failed, canceled)',
      '+ database:      index CREATE INDEX generated_images_status_updated_at_idx ON public.generated_images USING btree (status, updated_at)',
      '- schema.prisma: column generated_images.file_name character varying(200) NULL DEFAULT -',
      '- schema.prisma: column generated_images.progress integer NULL DEFAULT -',
      '- schema.prisma: enum job_status (queued, running, succeeded, failed, canceled, expired)',
      '- schema.prisma: index CREATE INDEX generated_images_status_updated_at_idx ON public.generated_images USING btree (status, updated_at DESC)',
    ]);
  });

  it('has the CHECK constraints the schema comment promises, and they bite', async () => {
    const url = await freshDb();
    await applyMigrations(url);
    await withClient(url, async (c) => {
      const { rows } = await c.query<{ conname: string }>(
        `SELECT conname FROM pg_constraint WHERE conrelid = 'generated_images'::regclass AND contype = 'c' ORDER BY conname`,
      );
      expect(rows.map((r) => r.conname)).toEqual([
        'generated_images_num_images_check',
        'generated_images_num_steps_check',
        'generated_images_pixel_steps_check',
        'generated_images_progress_check',
        'generated_images_queue_priority_check',
        'generated_images_seed_check',
        'generated_images_strength_check',
      ]);
      const tenant = (await c.query<{ id: string }>(`INSERT INTO tenants (name) VALUES ('checks') RETURNING id`)).rows[0]!.id;
      const insert = (over: Record<string, unknown>) => {
        const row = {
          tenant_id: tenant,
          pixel_steps: 4096,
          prompt: 'p',
          num_steps: 1,
          guidance_scale: 7.5,
          seed: 0,
          width: 64,
          height: 64,
          scheduler: 'euler',
          ...over,
        };
        const keys = Object.keys(row);
        return c.query(`INSERT INTO generated_images (${keys.join(', ')}) VALUES (${keys.map((_, i) => `$${i + 1}`).join(', ')})`, Object.values(row));
      };
      await insert({ seed: '4294967295', progress: 100 });
      await expect(insert({ progress: 101 })).rejects.toThrow(/generated_images_progress_check/);
      await expect(insert({ progress: -1 })).rejects.toThrow(/generated_images_progress_check/);
      await expect(insert({ num_steps: 0 })).rejects.toThrow(/generated_images_num_steps_check/);
      await expect(insert({ seed: '4294967296' })).rejects.toThrow(/generated_images_seed_check/);
      await expect(insert({ seed: -1 })).rejects.toThrow(/generated_images_seed_check/);
      await expect(insert({ pixel_steps: 0 })).rejects.toThrow(/generated_images_pixel_steps_check/);
      await expect(insert({ queue_priority: 0 })).rejects.toThrow(/generated_images_queue_priority_check/);
      await expect(insert({ queue_priority: 2 ** 21 })).rejects.toThrow(/generated_images_queue_priority_check/);
      // Every job has an owner that exists.
      await expect(insert({ tenant_id: '00000000-0000-4000-8000-000000000000' })).rejects.toThrow(/generated_images_tenant_id_fkey/);
      await insert({ num_images: 4 });
      await expect(insert({ num_images: 0 })).rejects.toThrow(/generated_images_num_images_check/);
      await expect(insert({ num_images: 5 })).rejects.toThrow(/generated_images_num_images_check/);
      await insert({ strength: 0 });
      await insert({ strength: 1 });
      await expect(insert({ strength: 1.5 })).rejects.toThrow(/generated_images_strength_check/);
      await expect(insert({ strength: -0.1 })).rejects.toThrow(/generated_images_strength_check/);
      // A job held for a model never served leaves its parameters to the model's first worker.
      await insert({ num_steps: null, guidance_scale: null, width: null, height: null, scheduler: null, model: 'held-model' });
    });
  });

  it('has the webhook trigger the schema comment promises: a job with a webhook that ends queues exactly one delivery', async () => {
    const url = await freshDb();
    await applyMigrations(url);
    await withClient(url, async (c) => {
      const { rows } = await c.query<{ tgname: string }>(
        `SELECT tgname FROM pg_trigger WHERE tgrelid = 'generated_images'::regclass AND NOT tgisinternal ORDER BY tgname`,
      );
      // Every trigger the schema comment names, and no other.
      expect(rows.map((r) => r.tgname)).toEqual([
        'generated_images_tenant_usage_delete',
        'generated_images_tenant_usage_insert',
        'generated_images_tenant_usage_update',
        'generated_images_webhook',
      ]);
      const tenant = (await c.query<{ id: string }>(`INSERT INTO tenants (name) VALUES ('hooks') RETURNING id`)).rows[0]!.id;
      const insert = async (webhook: string | null) =>
        (
          await c.query<{ id: string }>(
            `INSERT INTO generated_images (tenant_id, pixel_steps, prompt, num_steps, guidance_scale, seed, width, height, scheduler, webhook_url)
             VALUES ($1, 4096, 'p', 1, 7.5, 0, 64, 64, 'euler', $2) RETURNING id`,
            [tenant, webhook],
          )
        ).rows[0]!.id;
      const hooked = await insert('https://example.com/hook');
      const plain = await insert(null);
      for (const id of [hooked, plain]) {
        await c.query(`UPDATE generated_images SET status = 'running' WHERE id = $1`, [id]);
        await c.query(`UPDATE generated_images SET status = 'succeeded' WHERE id = $1`, [id]);
        // Setting the same status again is not a new outcome.
        await c.query(`UPDATE generated_images SET status = 'succeeded' WHERE id = $1`, [id]);
      }
      const deliveries = await c.query(`SELECT image_id, event_type, url, status FROM webhook_deliveries`);
      expect(deliveries.rows).toEqual([{ image_id: hooked, event_type: 'image.succeeded', url: 'https://example.com/hook', status: 'pending' }]);
    });
  });

  it('gives jobs made before accounts existed to a "legacy" tenant, charged what they asked for', async () => {
    const url = await freshDb();
    const dir = tempMigrations();
    // The accounts migration and every one after it are held back, a job is made, then they run.
    const all = readMigrations(dir).map((m) => m.name);
    const later = all.slice(all.findIndex((name) => name.endsWith('_accounts_quotas_retention')));
    const held = mkdtempSync(join(tmpdir(), 't2i-held-'));
    tempDirs.push(held);
    for (const name of later) {
      cpSync(join(dir, name), join(held, name), { recursive: true });
      rmSync(join(dir, name), { recursive: true });
    }
    await applyMigrations(url, { migrationsDir: dir });
    await withClient(url, (c) =>
      c.query(`INSERT INTO generated_images (prompt, num_steps, guidance_scale, seed, width, height, scheduler) VALUES ('old', 20, 7.5, 1, 512, 256, 'ddim')`),
    );
    for (const name of later) cpSync(join(held, name), join(dir, name), { recursive: true });
    expect((await applyMigrations(url, { migrationsDir: dir })).applied).toEqual(later);
    await withClient(url, async (c) => {
      const { rows } = await c.query<{ name: string; pixel_steps: string; queue_priority: number }>(
        `SELECT t.name, g.pixel_steps::text, g.queue_priority FROM generated_images g JOIN tenants t ON t.id = g.tenant_id`,
      );
      expect(rows).toEqual([{ name: 'legacy', pixel_steps: String(512 * 256 * 20), queue_priority: 1 }]);
    });
    // A database without jobs gets no such tenant.
    const empty = await freshDb();
    await applyMigrations(empty);
    expect(await withClient(empty, async (c) => (await c.query<{ n: number }>('SELECT count(*)::int AS n FROM tenants')).rows[0]!.n)).toBe(0);
  });

  it('serialises concurrent runs with the advisory lock: the migration is applied once', async () => {
    const url = await freshDb();
    const results = await Promise.all([applyMigrations(url), applyMigrations(url), applyMigrations(url)]);
    const names = readMigrations(MIGRATIONS_DIR).map((m) => m.name);
    expect(results.map((r) => r.applied.length).sort()).toEqual([0, 0, names.length]);
    const count = await withClient(url, async (c) => (await c.query<{ n: number }>('SELECT count(*)::int AS n FROM _prisma_migrations')).rows[0]?.n);
    expect(count).toBe(names.length);
  });

  it('rolls a failing migration back completely, records its logs, and refuses to go on until resolved', async () => {
    const url = await freshDb();
    const dir = tempMigrations();
    const bad = '29990101000000_bad';
    mkdirSync(join(dir, bad));
    writeFileSync(
      join(dir, bad, 'migration.sql'),
      '-- CreateTable\nCREATE TABLE "should_not_exist" ("id" INTEGER NOT NULL);\n\n' +
        'ALTER TABLE "generated_images" ADD COLUMN "should_not_exist" INTEGER;\n\n' +
        'INSERT INTO "no_such_table" VALUES (1);\n',
    );

    const err = await applyMigrations(url, { migrationsDir: dir }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect((err as MigrationError).code).toBe('P3018');
    expect((err as Error).message).toContain(bad);
    expect((err as Error).message).toMatch(/no_such_table/);

    await withClient(url, async (c) => {
      // The init migration before it stays applied; nothing of the bad one is left.
      expect((await c.query<{ ok: boolean }>("SELECT to_regclass('generated_images') IS NOT NULL AS ok")).rows[0]?.ok).toBe(true);
      expect((await c.query<{ ok: boolean }>("SELECT to_regclass('should_not_exist') IS NULL AS ok")).rows[0]?.ok).toBe(true);
      const col = await c.query("SELECT 1 FROM information_schema.columns WHERE table_name = 'generated_images' AND column_name = 'should_not_exist'");
      expect(col.rowCount).toBe(0);

      const { rows } = await c.query<MigrationRow>('SELECT * FROM _prisma_migrations WHERE migration_name = $1', [bad]);
      expect(rows).toHaveLength(1);
      const failed = rows[0]!;
      expect(failed.finished_at).toBeNull();
      expect(failed.rolled_back_at).toBeNull();
      expect(failed.applied_steps_count).toBe(0);
      expect(failed.checksum).toBe(sha256Hex(readFileSync(join(dir, bad, 'migration.sql'), 'utf8')));
      expect(failed.logs).toContain(`Migration name: ${bad}`);
      expect(failed.logs).toContain('Database error code: 42P01');
      expect(failed.logs).toMatch(/relation "no_such_table" does not exist/);
    });

    // The next run stops at the failed row, with a message that says what to do.
    const again = await applyMigrations(url, { migrationsDir: dir }).catch((e: unknown) => e);
    expect(again).toBeInstanceOf(MigrationError);
    expect((again as MigrationError).code).toBe('P3009');
    expect((again as Error).message).toContain(`The \`${bad}\` migration started at`);
    expect((again as Error).message).toMatch(/rolled_back_at/);

    // Resolving it as prisma migrate resolve --rolled-back does, and fixing the file, lets it through.
    await withClient(url, (c) => c.query('UPDATE _prisma_migrations SET rolled_back_at = now() WHERE migration_name = $1 AND finished_at IS NULL', [bad]));
    writeFileSync(join(dir, bad, 'migration.sql'), 'CREATE TABLE "now_it_exists" ("id" INTEGER NOT NULL);\n');
    expect(await applyMigrations(url, { migrationsDir: dir })).toEqual({ applied: [bad] });
  });

  it('refuses when an applied migration file was edited afterwards', async () => {
    const url = await freshDb();
    const dir = tempMigrations();
    await applyMigrations(url, { migrationsDir: dir });
    const [init] = readMigrations(dir);
    writeFileSync(join(dir, init!.name, 'migration.sql'), `${init!.sql}\n-- an innocent-looking edit\n`);
    const err = await applyMigrations(url, { migrationsDir: dir }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect((err as MigrationError).code).toBe('CHECKSUM_MISMATCH');
    expect((err as Error).message).toContain(init!.name);
  });

  it('refuses a non-empty database that has no migration history (needs baselining)', async () => {
    const url = await freshDb();
    await withClient(url, (c) => c.query('CREATE TABLE legacy (id int)'));
    const err = await applyMigrations(url).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect((err as MigrationError).code).toBe('P3005');
    expect((err as Error).message).toMatch(/legacy/);
    expect(
      await withClient(url, async (c) => (await c.query<{ t: string | null }>("SELECT to_regclass('_prisma_migrations')::text AS t")).rows[0]?.t),
    ).toBeNull();
  });

  it('says which database it could not reach', async () => {
    await expect(applyMigrations('postgresql://postgres@127.0.0.1:1/nothing')).rejects.toThrow(
      /cannot connect to postgresql:\/\/postgres@127\.0\.0\.1:1\/nothing/,
    );
  });
});

describe('createPrismaClient (generated client over @prisma/adapter-pg)', () => {
  let db: Db;
  let url: string;
  let tenantId: string;

  beforeAll(async () => {
    url = await freshDb();
    await applyMigrations(url);
    db = createPrismaClient(url, { poolMax: 3 });
    tenantId = (await db.tenant.create({ data: { name: 'schema-test' } })).id;
  });

  afterAll(async () => {
    await db?.$disconnect();
  });

  it('creates and reads back a job with database defaults filled in', async () => {
    const created = await db.generatedImage.create({
      data: {
        prompt: 'a lighthouse at dusk',
        negativePrompt: null,
        numSteps: 20,
        guidanceScale: 7.5,
        seed: 4294967295n,
        width: 512,
        height: 512,
        scheduler: 'euler_a',
        tenantId,
        pixelSteps: 512n * 512n * 20n,
      },
    });
    expect(created.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(created.status).toBe('queued');
    expect(created.progress).toBe(0);
    expect(created.attempts).toBe(0);
    expect(created.createdAt).toBeInstanceOf(Date);

    const read = await db.generatedImage.findUniqueOrThrow({ where: { id: created.id } });
    expect(read).toEqual(created);
    expect(read.seed).toBe(4294967295n);
    expect(read.guidanceScale).toBe(7.5);
  });

  it('fences updates on attempts: a conditional update matches once, a stale one matches nothing', async () => {
    const job = await db.generatedImage.create({
      data: { prompt: 'p', numSteps: 4, guidanceScale: 1, seed: 1n, width: 64, height: 64, scheduler: 'ddim', tenantId, pixelSteps: 64n * 64n * 4n },
    });
    const start = await db.generatedImage.updateMany({
      where: { id: job.id, attempts: 0, status: 'queued' },
      data: { status: 'running', attempts: { increment: 1 }, startedAt: new Date(), workerId: 'w1' },
    });
    expect(start.count).toBe(1);

    // A worker still holding attempt 0 must not be able to finish the job.
    const stale = await db.generatedImage.updateMany({
      where: { id: job.id, attempts: 0 },
      data: { status: 'succeeded', progress: 100 },
    });
    expect(stale.count).toBe(0);

    const fin = await db.generatedImage.updateMany({
      where: { id: job.id, attempts: 1 },
      data: { status: 'succeeded', progress: 100, fileName: `images/${job.id}.png`, finishedAt: new Date(), generationMs: 1234 },
    });
    expect(fin.count).toBe(1);
    const after = await db.generatedImage.findUniqueOrThrow({ where: { id: job.id } });
    expect(after).toMatchObject({ status: 'succeeded', attempts: 1, progress: 100, workerId: 'w1', generationMs: 1234 });
    expect(after.updatedAt.getTime()).toBeGreaterThanOrEqual(job.updatedAt.getTime());
  });

  it('surfaces the CHECK constraints as errors', async () => {
    await expect(
      db.generatedImage.create({
        data: { prompt: 'p', numSteps: 0, guidanceScale: 1, seed: 1n, width: 64, height: 64, scheduler: 'ddim', tenantId, pixelSteps: 1n },
      }),
    ).rejects.toThrow(/num_steps_check/);
  });

  it('survives the server ending an idle connection that only the SQL pool has used (no Prisma query yet): logged, not a crash', async () => {
    const url = await freshDb();
    const logged: string[] = [];
    const client = createPrismaClient(url, { log: (_level, msg) => void logged.push(msg) });
    try {
      const pool = sqlPool(client);
      const { rows } = await pool.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      const uncaught: unknown[] = [];
      const onUncaught = (err: unknown) => void uncaught.push(err);
      process.prependListener('uncaughtException', onUncaught);
      try {
        const ended = new Promise<void>((resolve) => pool.once('remove', () => resolve()));
        await withClient(url, (c) => c.query('SELECT pg_terminate_backend($1)', [rows[0]!.pid]));
        await ended;
      } finally {
        process.removeListener('uncaughtException', onUncaught);
      }
      expect(uncaught).toEqual([]);
      expect(logged.filter((m) => m.startsWith('idle database connection failed'))).toHaveLength(1);
      // The pool opens a new connection for the next statement.
      expect((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]!.one).toBe(1);
    } finally {
      await client.$disconnect();
    }
  });

  it('fails fast, not hangs, when the database is unreachable', async () => {
    const down = createPrismaClient('postgresql://postgres@127.0.0.1:1/nothing', { connectionTimeoutMillis: 500 });
    const t0 = Date.now();
    await expect(down.generatedImage.count()).rejects.toThrow();
    expect(Date.now() - t0).toBeLessThan(3000);
    await down.$disconnect();
  });
});
