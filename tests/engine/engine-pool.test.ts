import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GenerateParams } from '../../src/engine/pipeline.js';
import { writeRandomModel } from '../../src/engine/testmodels/make.js';
import { Engine, EngineDownError } from '../../src/engine/thread/engine-host.js';
import { EnginePool } from '../../src/engine/thread/engine-pool.js';

/**
 * ENGINE_SESSIONS: several engine threads, each with its own session of the model, behind one
 * engine. Real threads: the test double (whose [test:crash] ends its thread) and a random model.
 */

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-pool-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('a pool of engine sessions', () => {
  it('runs generations on both sessions at once', async () => {
    const pool = await EnginePool.start({ test: { stepMs: 100 } }, 2);
    try {
      const t0 = performance.now();
      await Promise.all([1, 2, 3, 4].map((seed) => pool.generate({ prompt: 'a red circle', numSteps: 5, seed })));
      // 4 generations of 5 steps of 100 ms: 2 s one at a time, 1 s on two sessions.
      expect(performance.now() - t0).toBeLessThan(1_800);
    } finally {
      await pool.close();
    }
  });

  it('gives the bytes one session of the same thread count gives', async () => {
    const modelDir = path.join(dir, 'sd');
    await writeRandomModel(modelDir, { unetChannels: 32 });
    const pool = await EnginePool.start({ modelDir, provider: 'cpu', threads: 1 }, 2);
    const one = await Engine.start({ modelDir, provider: 'cpu', threads: 1 });
    try {
      const reqs: GenerateParams[] = [1, 2, 3, 4].map((seed) => ({
        prompt: 'a blue square',
        width: 64,
        height: 64,
        numSteps: 4,
        seed,
        scheduler: 'euler_ancestral',
      }));
      const fromPool = await Promise.all(reqs.map((r) => pool.generate(r)));
      for (const [i, r] of reqs.entries()) expect(fromPool[i]!.png.equals((await one.generate(r)).png)).toBe(true);
    } finally {
      await Promise.all([pool.close(), one.close()]);
    }
  });

  it('is down when one session goes down: that session blames its own generation, the other session hands its generations back unblamed', async () => {
    const pool = await EnginePool.start({ test: { stepMs: 100 } }, 2);
    const downs: string[] = [];
    pool.onDown((err) => downs.push(err.reason));
    try {
      // The first goes to one session, the second to the other.
      const ordinary = pool.generate({ prompt: 'ordinary', numSteps: 20 });
      const poison = pool.generate({ prompt: 'poison [test:crash]', numSteps: 20 });
      const [o, p] = await Promise.allSettled([ordinary, poison]);
      expect(p).toMatchObject({ status: 'rejected', reason: { name: 'EngineDownError', reason: 'crashed', batchSize: 1 } });
      expect(o).toMatchObject({ status: 'rejected', reason: { name: 'EngineDownError', batchSize: 0 } });
      expect((o as PromiseRejectedResult).reason).toBeInstanceOf(EngineDownError);
      expect(downs).toEqual(['crashed']);
      expect(pool.alive).toBe(false);
      await expect(pool.generate({ prompt: 'later' })).rejects.toMatchObject({ name: 'EngineDownError' });
    } finally {
      await pool.close();
    }
  });
});
