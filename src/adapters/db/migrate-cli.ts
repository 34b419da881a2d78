/**
 * `npm run db:migrate` (tsx src/adapters/db/migrate-cli.ts [--dir prisma/migrations]): applies the
 * pending migrations to DATABASE_URL. Safe to run on every deploy or container start: it does
 * nothing when the database is up to date, and concurrent runs wait for each other.
 */
import { applyMigrations, MigrationError } from './migrate.js';

function usage(): never {
  console.error('usage: DATABASE_URL=postgresql://... tsx src/adapters/db/migrate-cli.ts [--dir <migrations folder>]');
  process.exit(2);
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  let migrationsDir: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--dir') migrationsDir = args[++i] ?? usage();
    else if (a?.startsWith('--dir=')) migrationsDir = a.slice('--dir='.length);
    else usage();
  }
  const url = process.env.DATABASE_URL;
  if (!url) {
    console.error('db:migrate: DATABASE_URL is not set; set it to the database to migrate (postgresql://user:pass@host:port/db).');
    process.exit(2);
  }
  const log = (m: string) => console.log(`db:migrate: ${m}`);
  await applyMigrations(url, migrationsDir ? { migrationsDir, log } : { log });
}

main().catch((err: unknown) => {
  const prefix = err instanceof MigrationError ? `db:migrate failed (${err.code})` : 'db:migrate failed';
  console.error(`${prefix}: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
