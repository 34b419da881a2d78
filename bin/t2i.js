#!/usr/bin/env node
// Runs the compiled CLI when `npm run build` has been run (the Docker images), else the
// TypeScript sources via tsx, a development dependency (a source checkout after `npm ci`).
import { existsSync } from 'node:fs';

const compiled = new URL('../dist/src/cli/main.js', import.meta.url);
if (existsSync(compiled)) {
  await import(compiled.href);
} else {
  let tsx;
  try {
    tsx = await import('tsx/esm/api');
  } catch (err) {
    if (err?.code !== 'ERR_MODULE_NOT_FOUND') throw err;
    process.stderr.write(
      't2i: dist/ is missing and tsx (a development dependency) is not installed: run `npm run build` for the compiled CLI, or `npm ci` to run from the TypeScript sources\n',
    );
    process.exit(1);
  }
  tsx.register();
  await import(new URL('../src/cli/main.ts', import.meta.url).href);
}
