import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPrismaClient, type Db } from '../../src/adapters/db/client.js';
import { createImagesRepo } from '../../src/adapters/images-repo.js';
import type { ImagesRepo } from '../../src/core/images.js';
import { failure } from '../../src/core/failures.js';
import { createTenant, NO_QUOTA } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

/**
 * The per-tenant usage counters (tenants.in_flight, pixel_steps_today) that admission reads are
 * kept by triggers; the job rows are the truth. Against real Postgres: after every way a job can
 * be created, run, end, be canceled, handed back or deleted, the counters equal what the rows say,
 * and concurrent admissions never overshoot a limit.
 */

let db: Db;
let repo: ImagesRepo;

beforeAll(async () => {
  const config = await isolatedConfig();
  db = createPrismaClient(config.DATABASE_URL);
  repo = createImagesRepo(db);
});
afterAll(async () => {
  await db?.$disconnect();
});

const job = (tenantId: string, steps = 4) => ({
  id: randomUUID(),
  tenantId,
  model: 'counted-model',
  prompt: 'counted',
  negativePrompt: null,
  numSteps: steps,
  guidanceScale: 7,
  seed: 1,
  width: 64,
  height: 64,
  scheduler: 'euler',
  pixelSteps: 64 * 64 * steps,
});

async function countersAndRows(tenantId: string) {
  const [t] = await db.$queryRaw<Array<{ in_flight: number; today: bigint }>>`
    SELECT in_flight, pixel_steps_today AS today FROM tenants WHERE id = ${tenantId}::uuid`;
  const [r] = await db.$queryRaw<Array<{ in_flight: number; today: bigint }>>`
    SELECT count(*) FILTER (WHERE status IN ('queued', 'running'))::int AS in_flight,
           COALESCE(sum(pixel_steps) FILTER (WHERE NOT (status = 'canceled' AND attempts = 0)), 0)::bigint AS today
      FROM generated_images WHERE tenant_id = ${tenantId}::uuid`;
  // Per model: jobs in flight, as tenant_model_usage counts them and as the rows say.
  const byModel = (ms: Array<{ model: string; n: number }>) => Object.fromEntries(ms.map((m) => [m.model, m.n]));
  const countedModels = byModel(await db.$queryRaw`SELECT model, in_flight AS n FROM tenant_model_usage WHERE tenant_id = ${tenantId}::uuid AND in_flight > 0`);
  const rowModels = byModel(
    await db.$queryRaw`SELECT model, count(*)::int AS n FROM generated_images
                        WHERE tenant_id = ${tenantId}::uuid AND status IN ('queued', 'running') AND model IS NOT NULL GROUP BY model`,
  );
  return {
    counters: { inFlight: t!.in_flight, pixelStepsToday: Number(t!.today), models: countedModels },
    rows: { inFlight: r!.in_flight, pixelStepsToday: Number(r!.today), models: rowModels },
  };
}

describe('per-tenant usage counters', () => {
  it('equal what the rows say after every kind of transition', async () => {
    const tenantId = await createTenant(db);
    const made = [];
    for (let i = 0; i < 10; i++) {
      // Two models, counted apart.
      const r = await repo.create({ ...job(tenantId, i + 1), model: i % 2 === 0 ? 'model-a' : 'model-b' }, NO_QUOTA);
      if (!('record' in r)) throw new Error('refused');
      made.push(r.record.id);
    }
    const [a, b, c, d, e, f, g, h] = made as [string, string, string, string, string, string, string, string];
    await repo.requestCancel(a); // queued -> canceled, never ran: refunded
    const sa = (await repo.startAttempt(b, 'w'))!;
    await repo.succeed(b, sa.attempt, { fileName: `images/${b}/1.png`, generationMs: 1, model: 'm' });
    const sc = (await repo.startAttempt(c, 'w'))!;
    await repo.fail(c, sc.attempt, failure('generation_failed'), true); // failed for good
    const sd = (await repo.startAttempt(d, 'w'))!;
    await repo.fail(d, sd.attempt, failure('generation_failed'), false); // back to queued
    const se = (await repo.startAttempt(e, 'w'))!;
    await repo.release(e, se.attempt, 'shutdown');
    await repo.startAttempt(f, 'w');
    await repo.requestCancel(f); // running: flagged, still in flight
    await repo.finishCanceled(f, 1); // then canceled after it ran: charged
    await repo.failAny(g, failure('worker_lost'));
    await repo.markDeleted(h); // queued: canceled and deleted
    const { counters, rows } = await countersAndRows(tenantId);
    expect(counters).toEqual(rows);
    // 10 made; a, b, c, f, g, h ended; d, e and the last two remain.
    expect(counters.inFlight).toBe(4);
  });

  it('follow the charge a worker corrects when it fills in the parameters a held job left to its model', async () => {
    const tenantId = await createTenant(db);
    // A job of a model never served: its parameters wait for the model's first worker, charged
    // as 512x512 at 50 steps (GENERATION_DEFAULTS) meanwhile; two images.
    const held = {
      ...job(tenantId),
      numSteps: null,
      guidanceScale: null,
      scheduler: null,
      width: 128,
      height: 128,
      numImages: 2,
      pixelSteps: 128 * 128 * 50 * 2,
    };
    const r = await repo.create(held, NO_QUOTA);
    if (!('record' in r)) throw new Error('refused');
    const claimed = (await repo.startAttempt(held.id, 'w', { numSteps: 4, guidanceScale: 8.5, width: 512, height: 512, scheduler: 'lcm' }))!;
    expect(claimed.record).toMatchObject({ numSteps: 4, guidanceScale: 8.5, width: 128, height: 128, scheduler: 'lcm', pixelSteps: 128 * 128 * 4 * 2 });
    const { counters, rows } = await countersAndRows(tenantId);
    expect(counters).toEqual(rows);
    expect(counters.pixelStepsToday).toBe(128 * 128 * 4 * 2);
  });

  it('never let concurrent admissions overshoot the in-flight cap or the daily budget', async () => {
    const capped = await createTenant(db);
    const results = await Promise.all(Array.from({ length: 30 }, () => repo.create(job(capped), { ...NO_QUOTA, maxInFlight: 7 })));
    expect(results.filter((r) => 'record' in r)).toHaveLength(7);
    expect(results.filter((r) => 'exceeded' in r && r.exceeded === 'in_flight')).toHaveLength(23);

    const budgeted = await createTenant(db);
    const cost = 64 * 64 * 4;
    const spent = await Promise.all(Array.from({ length: 30 }, () => repo.create(job(budgeted), { ...NO_QUOTA, dailyPixelSteps: cost * 11 })));
    expect(spent.filter((r) => 'record' in r)).toHaveLength(11);
    for (const t of [capped, budgeted]) {
      const { counters, rows } = await countersAndRows(t);
      expect(counters).toEqual(rows);
    }
  });

  it('admit a batch of many tenants’ jobs in one statement: each tenant in arrival order, within its limits, ranked', async () => {
    const [a, b, c] = [await createTenant(db), await createTenant(db), await createTenant(db)];
    await db.tenant.update({ where: { id: a }, data: { maxInFlight: 4 } });
    const cost = 64 * 64 * 4;
    await db.tenant.update({ where: { id: c }, data: { dailyPixelSteps: BigInt(cost * 3) } });
    // Interleaved: a, b, c, a, b, c, ...
    const batch = Array.from({ length: 18 }, (_, i) => job([a, b, c][i % 3]!));
    const results = await repo.createMany(batch, { maxInFlight: 0, dailyPixelSteps: 0 });
    const of = (t: string) => results.filter((_, i) => batch[i]!.tenantId === t);
    const ranks = (t: string) => of(t).map((r) => ('record' in r ? r.record.queuePriority : r.exceeded));
    expect(ranks(a)).toEqual([1, 2, 3, 4, 'in_flight', 'in_flight']);
    expect(ranks(b)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(ranks(c)).toEqual([1, 2, 3, 'daily_pixel_steps', 'daily_pixel_steps', 'daily_pixel_steps']);
    for (const t of [a, b, c]) {
      const { counters, rows } = await countersAndRows(t);
      expect(counters).toEqual(rows);
    }
  });

  it('rank a tenant’s jobs per model, in one batch and after it: each model has its own queue', async () => {
    const t = await createTenant(db);
    const batch = Array.from({ length: 6 }, (_, i) => ({ ...job(t), model: i % 2 === 0 ? 'model-a' : 'model-b' }));
    const results = await repo.createMany(batch, NO_QUOTA);
    expect(results.map((r) => ('record' in r ? r.record.queuePriority : r.exceeded))).toEqual([1, 1, 2, 2, 3, 3]);
    const later = await repo.create({ ...job(t), model: 'model-c' }, NO_QUOTA);
    expect('record' in later && later.record.queuePriority).toBe(1);
    const next = await repo.create({ ...job(t), model: 'model-b' }, NO_QUOTA);
    expect('record' in next && next.record.queuePriority).toBe(4);
    const { counters, rows } = await countersAndRows(t);
    expect(counters).toEqual(rows);
    expect(counters.models).toEqual({ 'model-a': 3, 'model-b': 4, 'model-c': 1 });
  });

  it('give each admitted job its rank among the tenant’s jobs in flight as its queue priority', async () => {
    const t = await createTenant(db);
    const priorities: number[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await repo.create(job(t), NO_QUOTA);
      if ('record' in r) priorities.push(r.record.queuePriority);
    }
    expect(priorities).toEqual([1, 2, 3, 4, 5]);
  });
});
