import sharp from 'sharp';
import { afterAll, describe, expect, it } from 'vitest';
import type { Progress } from '../../src/engine/pipeline.js';
import { Engine, type EngineOptions } from '../../src/engine/thread/engine-host.js';

/**
 * A request for several images through a real engine thread and its batcher, on the test double
 * (which batches as the real pipeline does): its images are generations of the batching path,
 * and the request still behaves as one job: one result, one progress that only grows, previews,
 * cancellation of all its images and nothing else, and blame for an engine that goes down only
 * when no other request shared the batch.
 */

const engines: Engine[] = [];
afterAll(async () => {
  await Promise.all(engines.map((e) => e.close()));
});

async function engine(batchMax: number, batchWaitMs = 300, stepMs = 30): Promise<Engine> {
  const options: EngineOptions = { test: { stepMs }, batchMax, batchWaitMs };
  const e = await Engine.start(options);
  engines.push(e);
  return e;
}

async function secondPixel(png: Buffer): Promise<number[]> {
  const { data } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  return [...data.subarray(3, 6)];
}

describe('a request for several images in the engine thread', () => {
  it("shares a batch with another request's generation; one result with every seed; one report per shared step", async () => {
    const e = await engine(4);
    const progress: Progress[] = [];
    const [several, single] = await Promise.all([
      e.generate({ prompt: 'several', seed: 4294967295, numSteps: 4, numImages: 3 }, { previewEvery: 1, onProgress: (p) => progress.push(p) }),
      e.generate({ prompt: 'one', seed: 5, numSteps: 4 }),
    ]);
    expect([several.batchSize, single.batchSize]).toEqual([4, 4]);
    expect(several.seed).toBe(4294967295);
    expect(several.more!.map((m) => m.seed)).toEqual([0, 1]);
    // The double paints every pixel but the first in its seed's colour.
    const colours = await Promise.all([several.png, ...several.more!.map((m) => m.png)].map(secondPixel));
    expect(colours).toEqual([
      [255, 255, 255],
      [0, 0, 0],
      [1, 0, 0],
    ]);
    // The three images step together: each step is reported once, counting all three.
    expect(progress.map((p) => [p.step, p.totalSteps])).toEqual([
      [3, 12],
      [6, 12],
      [9, 12],
      [12, 12],
    ]);
    expect(progress.every((p) => p.preview !== undefined)).toBe(true);
  });

  it('with BATCH_MAX 1 runs its images one after another, its progress still only growing', async () => {
    const e = await engine(1);
    const progress: number[] = [];
    const g = await e.generate({ prompt: 'several', seed: 10, numSteps: 3, numImages: 2 }, { onProgress: (p) => progress.push(p.step) });
    expect(g.batchSize).toBe(1);
    expect(g.more!.map((m) => m.seed)).toEqual([11]);
    expect(progress).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('more images than BATCH_MAX go in several batches', async () => {
    const e = await engine(2);
    const started: number[] = [];
    const g = await e.generate({ prompt: 'several', seed: 1, numSteps: 2, numImages: 3 }, { onStart: (id) => started.push(id) });
    expect(g.batchSize).toBe(2);
    expect(g.more).toHaveLength(2);
    expect(started).toHaveLength(1);
  });

  it('a canceled request stops all of its images, running or waiting; a request it shared a batch with finishes', async () => {
    const e = await engine(3, 300, 50);
    const controller = new AbortController();
    // Leaves first with images 0 and 1 (BATCH_MAX 3); image 2 waits for the next batch.
    const other = e.generate({ prompt: 'other', seed: 2, numSteps: 10 });
    const several = e.generate(
      { prompt: 'several', seed: 1, numSteps: 10, numImages: 3 },
      {
        signal: controller.signal,
        onProgress: (p) => {
          if (p.step >= 4) controller.abort();
        },
      },
    );
    await expect(several).rejects.toMatchObject({ name: 'AbortError' });
    const g = await other;
    expect([g.seed, g.batchSize]).toEqual([2, 3]);
  });

  it('takes the blame for a fall only when its batch held no other request', async () => {
    const lone = await engine(4);
    await expect(lone.generate({ prompt: 'several [test:crash]', numSteps: 3, numImages: 3 })).rejects.toMatchObject({
      name: 'EngineDownError',
      batchSize: 1,
    });
    const shared = await engine(4);
    const [poison, bystander] = await Promise.allSettled([
      shared.generate({ prompt: 'several [test:crash]', numSteps: 3, numImages: 2 }),
      shared.generate({ prompt: 'bystander', numSteps: 3 }),
    ]);
    expect(poison).toMatchObject({ status: 'rejected', reason: { name: 'EngineDownError', batchSize: 2 } });
    expect(bystander).toMatchObject({ status: 'rejected', reason: { name: 'EngineDownError', batchSize: 2 } });
  });

  it('run alone (a suspect), it shares runs only among its own images', async () => {
    const e = await engine(4);
    const [suspect, other] = await Promise.all([
      e.generate({ prompt: 'suspect', numSteps: 2, numImages: 2 }, { alone: true }),
      e.generate({ prompt: 'other', numSteps: 2 }),
    ]);
    expect([suspect.batchSize, other.batchSize]).toEqual([2, 1]);
  });

  it('an image that fails fails its request, whose other images stop', async () => {
    const e = await engine(4);
    await expect(e.generate({ prompt: 'several [test:fail]', numSteps: 3, numImages: 3 })).rejects.toThrow(/failed as asked/);
    // The thread is still up, and its queue empty of the failed request's images.
    expect((await e.generate({ prompt: 'next', numSteps: 2, seed: 3 })).seed).toBe(3);
  });
});
