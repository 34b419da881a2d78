import type { TestProject } from 'vitest/node';
import { startServices, type LocalServices } from '../../src/dev/services.js';
import { writeOracleModel } from '../../src/engine/testmodels/make.js';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

/**
 * Starts real Postgres, Redis and S3 (OpenStack Swift) once per test run, and writes the oracle
 * model once; test files isolate themselves with their own database, queue name and bucket
 * (tests/support/system.ts).
 */

export interface SharedServices {
  postgresUrl: string;
  redisUrl: string;
  s3: { endpoint: string; accessKey: string; secretKey: string; region: string };
  oracleModelDir: string;
}

declare module 'vitest' {
  export interface ProvidedContext {
    services: SharedServices;
  }
}

let services: LocalServices | undefined;
let modelsDir: string | undefined;

export async function setup(project: TestProject): Promise<void> {
  services = await startServices();
  modelsDir = await mkdtemp(path.join(os.tmpdir(), 't2i-test-models-'));
  const oracleModelDir = path.join(modelsDir, 'oracle');
  await writeOracleModel(oracleModelDir);
  project.provide('services', {
    postgresUrl: services.postgres.url,
    redisUrl: services.redis.url,
    s3: { endpoint: services.s3.endpoint, accessKey: services.s3.accessKey, secretKey: services.s3.secretKey, region: services.s3.region },
    oracleModelDir,
  });
}

export async function teardown(): Promise<void> {
  await services?.stop();
  if (modelsDir) await rm(modelsDir, { recursive: true, force: true });
}
