import { existsSync } from 'node:fs';
import { chmod, cp, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { maxAbs } from '../support/pixels.js';

/**
 * The export made by diffusers' own converter (../shared/data/tiny-sd-onnx, see its README):
 * float32 timestep of shape [batch], weights in weights.pb, every dimension symbolic, a
 * stochastic VAE encoder, the real CLIP tokenizer. It must load and generate with the guidance
 * pass batched (its symbolic batch allows it) and unbatched (the same export with its batch fixed
 * to 1, as some exports have), to the same picture.
 */

// shared/ sits beside the checkout (CI copies it there); a git worktree one level further down
// finds it one level up.
const CANDIDATES = [path.resolve('..', 'shared', 'data', 'tiny-sd-onnx'), path.resolve('..', '..', 'shared', 'data', 'tiny-sd-onnx')];
const TINY_DIR = CANDIDATES.find((p) => existsSync(path.join(p, 'model_index.json')));
if (!TINY_DIR) throw new Error(`tiny-sd-onnx not found: expected it at ${CANDIDATES.join(' or ')}`);

let dir: string;
let batched: LoadedModel;
let unbatched: LoadedModel;

/** A copy whose UNet declares batch 1 for sample and encoder_hidden_states. */
async function fixedBatchCopy(to: string): Promise<void> {
  await cp(TINY_DIR!, to, { recursive: true });
  await makeWritable(to);
  const file = path.join(to, 'unet', 'model.onnx');
  const { onnx } = onnxProto;
  const model = onnx.ModelProto.decode(await readFile(file));
  for (const input of model.graph!.input!) {
    if (input.name === 'sample' || input.name === 'encoder_hidden_states') input.type!.tensorType!.shape!.dim![0] = { dimValue: 1 };
  }
  await writeFile(file, onnx.ModelProto.encode(model).finish());
}

/** The shared copy is read-only, and cp keeps its modes. */
async function makeWritable(p: string): Promise<void> {
  const entries = await readdir(p, { withFileTypes: true });
  await chmod(p, 0o755);
  for (const e of entries) {
    if (e.isDirectory()) await makeWritable(path.join(p, e.name));
    else await chmod(path.join(p, e.name), 0o644);
  }
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-tiny-sd-'));
  await fixedBatchCopy(path.join(dir, 'batch-1'));
  batched = await loadModel(TINY_DIR, { provider: 'cpu' });
  unbatched = await loadModel(path.join(dir, 'batch-1'), { provider: 'cpu' });
});

afterAll(async () => {
  await batched?.release();
  await unbatched?.release();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const RUN: GenerateParams = { prompt: 'a photo of a cat', negativePrompt: 'blurry', seed: 42, numSteps: 4, width: 64, height: 64, guidanceScale: 7.5 };

describe("diffusers' converter export (tiny-sd-onnx)", () => {
  it('loads as an SD 1.x-shaped model with its PNDM scheduler', () => {
    expect(batched.variant).toMatchObject({ family: 'sd', inpainting: false, guidanceEmbedding: false });
    expect(batched.defaults.scheduler).toBe('pndm');
    expect(batched.unet.input('timestep')).toMatchObject({ type: 'float32', shape: ['batch'] });
    expect(unbatched.unet.input('sample').shape[0]).toBe(1);
  });

  it('guidance batched (one UNet run per step) and unbatched (two) give the same picture', async () => {
    const runs = [batched.unet.runs, unbatched.unet.runs];
    const a = await new StableDiffusionPipeline(batched).generate(RUN, { returnLatents: true });
    const b = await new StableDiffusionPipeline(unbatched).generate(RUN, { returnLatents: true });
    expect(batched.unet.runs - runs[0]!).toBe(5); // PNDM: 4 steps, the second timestep twice
    expect(unbatched.unet.runs - runs[1]!).toBe(10);
    expect(maxAbs(a.latents!, b.latents!)).toBeLessThan(1e-4);
    const [pa, pb] = await Promise.all([sharp(a.png).raw().toBuffer(), sharp(b.png).raw().toBuffer()]);
    expect(maxAbs(pa, pb)).toBeLessThanOrEqual(1);
  });

  it('is deterministic per seed for every scheduler', async () => {
    const pipe = new StableDiffusionPipeline(batched);
    for (const scheduler of ['pndm', 'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m', 'lcm'] as const) {
      const one = await pipe.generate({ ...RUN, scheduler });
      const two = await pipe.generate({ ...RUN, scheduler });
      expect(Buffer.compare(one.png, two.png)).toBe(0);
    }
  });

  it('runs image-to-image through its stochastic VAE encoder', async () => {
    const image = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 120, b: 40 } } })
      .png()
      .toBuffer();
    const steps: number[] = [];
    const g = await new StableDiffusionPipeline(batched).generate({ ...RUN, image, strength: 0.5 }, { onProgress: (p) => steps.push(p.step) });
    expect([g.width, g.height, g.strength]).toEqual([64, 64, 0.5]);
    // int(4 x 0.5) + steps_offset 1 = 3 noised steps; PNDM's list has 5 entries, the loop takes the last 3.
    expect(steps).toEqual([1, 2, 3]);
  });
});
