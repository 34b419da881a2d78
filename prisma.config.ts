/**
 * Prisma 7 configuration: the CLI (`prisma generate`, and `prisma migrate ...` where a schema
 * engine is available) reads the schema path, the migrations folder and the database URL here.
 *
 * DATABASE_URL is read with process.env rather than Prisma's env(), which throws when the variable
 * is unset: `prisma generate` runs at install time (postinstall) with no database configured.
 */
import { defineConfig } from 'prisma/config';

export default defineConfig({
  schema: 'prisma/schema.prisma',
  migrations: { path: 'prisma/migrations' },
  datasource: { url: process.env.DATABASE_URL },
});
