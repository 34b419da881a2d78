#!/usr/bin/env node
/**
 * Runs `prisma generate` offline.
 *
 * Prisma 7's CLI insists on a schema-engine binary and tries to download one when it is missing,
 * which fails without internet, even though `generate` never runs it. Pointing
 * PRISMA_SCHEMA_ENGINE_BINARY at any existing file skips the download; we create an empty
 * placeholder in the OS temp folder for the duration of the command. An engine you set yourself
 * in PRISMA_SCHEMA_ENGINE_BINARY is kept.
 *
 * Usage: node scripts/prisma-generate.mjs [extra prisma generate args]
 *        node scripts/prisma-generate.mjs --postinstall   (npm "postinstall": skips with a
 *        notice when the prisma CLI is absent, as after `npm ci --omit=dev`, instead of failing
 *        the install)
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const postinstall = args.includes('--postinstall');
const passThrough = args.filter((a) => a !== '--postinstall');

let cli;
try {
  cli = createRequire(join(root, 'package.json')).resolve('prisma/build/index.js');
} catch {
  const msg = 'prisma-generate: the `prisma` CLI (a devDependency) is not installed, so the client in src/generated/prisma was not generated.';
  if (postinstall) {
    console.warn(`${msg} Skipping (production install); build the app where dev dependencies are installed.`);
    process.exit(0);
  }
  console.error(`${msg} Run \`npm ci\` (with dev dependencies) first.`);
  process.exit(1);
}

let placeholderDir;
const env = {
  ...process.env,
  // No update check / telemetry ping: offline it only adds a timeout.
  CHECKPOINT_DISABLE: '1',
  PRISMA_HIDE_UPDATE_MESSAGE: '1',
};
if (!env.PRISMA_SCHEMA_ENGINE_BINARY) {
  placeholderDir = mkdtempSync(join(tmpdir(), 't2i-prisma-'));
  const placeholder = join(placeholderDir, 'schema-engine-placeholder');
  writeFileSync(placeholder, '#!/bin/sh\necho "placeholder schema engine: generate does not need one" >&2\nexit 1\n');
  chmodSync(placeholder, 0o755);
  env.PRISMA_SCHEMA_ENGINE_BINARY = placeholder;
}

try {
  const res = spawnSync(process.execPath, [cli, 'generate', ...passThrough], { cwd: root, env, stdio: 'inherit' });
  if (res.error) {
    console.error(`prisma-generate: could not run ${cli}: ${res.error.message}`);
    process.exitCode = 1;
  } else {
    process.exitCode = res.status ?? 1;
  }
} finally {
  if (placeholderDir) rmSync(placeholderDir, { recursive: true, force: true });
}
