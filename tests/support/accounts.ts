import { randomUUID } from 'node:crypto';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { AccountsService } from '../../src/core/accounts.js';
import { pixelStepsOf } from '../../src/core/job-params.js';
import type { ImageRecord, ImagesRepo, NewImage, QuotaLimits } from '../../src/core/images.js';

/** An API key as a test uses it: the key, its public prefix, its tenant, and the header to send. */
export interface TestKey {
  key: string;
  prefix: string;
  tenant: string;
  auth: { authorization: string };
}

/**
 * Creates a key in the database at `databaseUrl` through the same service `t2i keys create` uses
 * (a fresh tenant unless one is named).
 */
export async function createTestKey(databaseUrl: string, tenant = `tenant-${randomUUID().slice(0, 8)}`): Promise<TestKey> {
  const db = createPrismaClient(databaseUrl, { poolMax: 1 });
  try {
    const { key, info } = await new AccountsService(createAccountsRepo(db)).createKey(tenant, 'test');
    return { key, prefix: info.prefix, tenant, auth: { authorization: `Bearer ${key}` } };
  } finally {
    await db.$disconnect();
  }
}

/** Revokes a key by its prefix, as `t2i keys revoke` does. */
export async function revokeTestKey(databaseUrl: string, prefix: string): Promise<void> {
  const db = createPrismaClient(databaseUrl, { poolMax: 1 });
  try {
    await new AccountsService(createAccountsRepo(db)).revokeKey(prefix);
  } finally {
    await db.$disconnect();
  }
}

/** Quotas that never refuse, for tests that create rows through the repository directly. */
export const NO_QUOTA: QuotaLimits = { maxInFlight: 0, dailyPixelSteps: 0, dayStart: new Date(0) };

/** A tenant row of its own, for tests that create jobs without the API. */
export async function createTenant(db: Db, name = `tenant-${randomUUID().slice(0, 8)}`): Promise<string> {
  return (await db.tenant.create({ data: { name } })).id;
}

/** The model of jobs tests insert without naming one. */
export const TEST_MODEL = 'test-model';

/** Inserts a job through the repository, as the API does (charged width x height x steps, no quota), on TEST_MODEL unless it names a model. */
export async function insertJob(repo: ImagesRepo, job: Omit<NewImage, 'pixelSteps' | 'model'> & { model?: string }): Promise<ImageRecord> {
  const r = await repo.create({ ...job, model: job.model ?? TEST_MODEL, pixelSteps: pixelStepsOf(job) }, NO_QUOTA);
  if (!('record' in r)) throw new Error('insertJob: refused by a quota');
  return r.record;
}
