import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { readPngText } from '../../src/engine/png.js';
import { writeRandomModel } from '../../src/engine/testmodels/make.js';

/**
 * Several images from one request (num_images): on a random-weight model, where every seed
 * gives a different picture, image k is byte for byte the image a request seeded seed + k alone
 * gives, for a deterministic and a noise-adding scheduler, with and without guidance, whether the
 * images shared UNet runs (BATCH_MAX 4) or ran one after another (BATCH_MAX 1, or where the
 * batching rule of src/engine/batching.ts keeps them apart).
 */

let dir: string;
let model: LoadedModel;
/** BATCH_MAX 1: every generation alone. */
let pipe: StableDiffusionPipeline;
/** BATCH_MAX 4: a request's images share UNet runs where the rule allows. */
let batched: StableDiffusionPipeline;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-several-'));
  await writeRandomModel(path.join(dir, 'sd'), { seed: 3 });
  model = await loadModel(path.join(dir, 'sd'), { provider: 'cpu' });
  pipe = new StableDiffusionPipeline(model);
  batched = new StableDiffusionPipeline(model, { max: 4 });
});

afterAll(async () => {
  await model?.release();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function rgb(png: Buffer): Promise<Buffer> {
  return (await sharp(png).raw().toBuffer({ resolveWithObject: true })).data;
}

function maxDiff(a: Buffer, b: Buffer): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe('num_images', () => {
  it('with guidance and BATCH_MAX 4, the images of a request share each UNet run', async () => {
    const runs = model.unet.runs;
    const several = await batched.generate({
      prompt: 'a red circle',
      seed: 9,
      numSteps: 5,
      width: 64,
      height: 64,
      scheduler: 'euler',
      guidanceScale: 7.5,
      numImages: 3,
    });
    expect(several.batchSize).toBe(3);
    expect(model.unet.runs - runs).toBe(5);
  });

  for (const [scheduler, guidanceScale] of [
    ['euler', 7.5],
    ['euler_ancestral', 7.5],
    ['dpmpp_2m', 1],
  ] as const) {
    it(`${scheduler}, guidance ${guidanceScale}: image k is seed + k's image, byte for byte, batched or not`, async () => {
      const base: GenerateParams = { prompt: 'a red circle', seed: 4294967294, numSteps: 6, width: 64, height: 64, scheduler, guidanceScale };
      const seeds = [4294967294, 4294967295, 0];
      const alone: Buffer[] = [];
      for (const seed of seeds) alone.push((await pipe.generate({ ...base, seed })).png);
      // Without guidance a lone row rounds differently on more than one thread: then the images run one after another.
      const together = guidanceScale > 1 || batched.batching.unguided === 'rows' ? 3 : 1;
      for (const [p, batchSize] of [
        [pipe, 1],
        [batched, together],
      ] as const) {
        const several = await p.generate({ ...base, numImages: 3 });
        expect(several.seed).toBe(4294967294);
        expect(several.batchSize).toBe(batchSize);
        // Seeds wrap at 2^32.
        expect(several.more!.map((m) => m.seed)).toEqual([4294967295, 0]);
        const images = [several.png, ...several.more!.map((m) => m.png)];
        for (const [k, seed] of seeds.entries()) {
          expect(images[k]!.equals(alone[k]!), `image ${k}, BATCH_MAX ${p.batching.max}`).toBe(true);
          expect(readPngText(images[k]!).seed).toBe(String(seed));
        }
        // And they are different pictures.
        expect(maxDiff(await rgb(images[0]!), await rgb(images[1]!))).toBeGreaterThan(10);
      }
    });
  }

  it('refuses more than 4, and several images of an input picture', async () => {
    await expect(pipe.generate({ prompt: 'x', numImages: 5, width: 64, height: 64 })).rejects.toThrow(/`num_images` has to be an integer from 1 to 4/);
    const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: '#ff0000' } })
      .png()
      .toBuffer();
    await expect(pipe.generate({ prompt: 'x', numImages: 2, image: png })).rejects.toThrow(/text-to-image only/);
  });
});
