import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { readPngText } from '../../src/engine/png.js';
import { writeRandomModel } from '../../src/engine/testmodels/make.js';
import { Denoiser } from '../../src/engine/unet.js';

/**
 * Several images from one generation (num_images): on a random-weight model, where every seed
 * gives a different picture, image k of a batched run is the image a run seeded seed + k alone
 * gives, for a deterministic and a noise-adding scheduler, with and without guidance.
 */

let dir: string;
let model: LoadedModel;
let pipe: StableDiffusionPipeline;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-several-'));
  await writeRandomModel(path.join(dir, 'sd'), { seed: 3 });
  model = await loadModel(path.join(dir, 'sd'), { provider: 'cpu' });
  pipe = new StableDiffusionPipeline(model);
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
  it('runs as one UNet batch on this export (its batch dimension is free)', () => {
    expect(Denoiser.batchable(model)).toBe(true);
  });

  for (const [scheduler, guidanceScale] of [
    ['euler', 7.5],
    ['euler_ancestral', 7.5],
    ['dpmpp_2m', 1],
  ] as const) {
    it(`${scheduler}, guidance ${guidanceScale}: image k is seed + k's image`, async () => {
      const base: GenerateParams = { prompt: 'a red circle', seed: 4294967294, numSteps: 6, width: 64, height: 64, scheduler, guidanceScale };
      const several = await pipe.generate({ ...base, numImages: 3 });
      expect(several.seed).toBe(4294967294);
      // Seeds wrap at 2^32.
      expect(several.more!.map((m) => m.seed)).toEqual([4294967295, 0]);
      const images = [several.png, ...several.more!.map((m) => m.png)];
      const seeds = [4294967294, 4294967295, 0];
      for (const [k, seed] of seeds.entries()) {
        const alone = await pipe.generate({ ...base, seed });
        // A batched UNet run may round differently from a single one in the last float bits.
        expect(maxDiff(await rgb(images[k]!), await rgb(alone.png)), `image ${k}`).toBeLessThanOrEqual(1);
        expect(readPngText(images[k]!).seed).toBe(String(seed));
      }
      // And they are different pictures.
      expect(maxDiff(await rgb(images[0]!), await rgb(images[1]!))).toBeGreaterThan(10);
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
