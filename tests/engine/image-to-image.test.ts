import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imageToImagePlan } from '../../src/engine/image-to-image.js';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { createScheduler, SCHEDULER_NAMES } from '../../src/engine/schedulers/index.js';
import { SD15_SCHEDULER_CONFIG, writeOracleModel, writeRandomModel } from '../../src/engine/testmodels/make.js';
import { guidedTargetLatent, oracleImage } from '../../src/engine/testmodels/oracle-spec.js';
import { inpaintingStats, maxAbs, meanAbs } from '../support/pixels.js';

/**
 * Image-to-image and the legacy 4-channel inpainting path, on the SD and SDXL oracles (whose
 * VAE round trip is exact for pictures made of 8x8 blocks) and on a random-weight model.
 */

let dir: string;
let sd: LoadedModel;
let sdxl: LoadedModel;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-img2img-'));
  await writeOracleModel(path.join(dir, 'sd'));
  await writeOracleModel(path.join(dir, 'sdxl'), { variant: 'sdxl' });
  sd = await loadModel(path.join(dir, 'sd'), { provider: 'cpu' });
  sdxl = await loadModel(path.join(dir, 'sdxl'), { provider: 'cpu' });
});

afterAll(async () => {
  await sd?.release();
  await sdxl?.release();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const W = 128;

/** A picture of 8x8 blocks: a diagonal colour ramp, so every block differs. */
function blockPicture(width = W, height = W): Buffer {
  const raw = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const bx = Math.floor(x / 8);
      const by = Math.floor(y / 8);
      raw.set([(bx * 16) % 256, (by * 16) % 256, ((bx + by) * 8) % 256], (y * width + x) * 3);
    }
  }
  return raw;
}

const png = (raw: Buffer, width = W, height = W) =>
  sharp(raw, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
const pixels = async (p: Buffer) => sharp(p).raw().toBuffer();

describe('image-to-image timesteps follow the references', () => {
  it("diffusers' ONNX SD rule: PNDM, 50 steps, strength 0.8, steps_offset 1 noise at 801 and run 41 steps from it", () => {
    const s = createScheduler('pndm', SD15_SCHEDULER_CONFIG);
    s.setTimesteps(50);
    // PNDM's list repeats its second timestep: 981, 961, 961, 941, ... (51 entries).
    const plan = imageToImagePlan(s.timesteps, 50, 0.8, 1, 'diffusers-onnx');
    expect(plan.noiseTimestep).toBe(801);
    expect(plan.timesteps.length).toBe(41);
    expect(plan.timesteps[0]).toBe(801);
  });

  it("diffusers' ONNX SD rule with Euler noises one timestep above where the loop starts (its offset quirk)", () => {
    const s = createScheduler('euler', SD15_SCHEDULER_CONFIG);
    s.setTimesteps(50);
    const ts = s.timesteps;
    const plan = imageToImagePlan(ts, 50, 0.8, 1, 'diffusers-onnx');
    expect(plan.noiseTimestep).toBe(ts[9]);
    expect(plan.timesteps[0]).toBe(ts[10]);
    expect(plan.timesteps.length).toBe(40);
  });

  it("optimum's SDXL rule: int(n x strength) steps, noised at the first of them (SDXL-Turbo: 2 steps at 0.5 run 1)", () => {
    const s = createScheduler('euler_ancestral', { ...SD15_SCHEDULER_CONFIG, timestep_spacing: 'trailing' });
    s.setTimesteps(2);
    const plan = imageToImagePlan(s.timesteps, 2, 0.5, 1, 'optimum-sdxl');
    expect(Array.from(plan.timesteps)).toEqual([499]);
    expect(plan.noiseTimestep).toBe(499);
  });

  it('refuses a strength that leaves no step to run, naming both parameters', () => {
    const s = createScheduler('euler', SD15_SCHEDULER_CONFIG);
    s.setTimesteps(10);
    expect(() => imageToImagePlan(s.timesteps, 10, 0.05, 0, 'optimum-sdxl')).toThrow(/`strength` 0\.05 with `num_steps` 10 leaves no denoising step to run/);
  });
});

describe('image-to-image on the oracle', () => {
  it('strength 0 returns the input (the VAE round trip of 8x8 blocks is exact)', async () => {
    const input = blockPicture();
    const g = await new StableDiffusionPipeline(sd).generate({
      prompt: 'a red circle',
      image: await png(input),
      strength: 0,
      seed: 1,
      scheduler: 'euler',
      numSteps: 20,
    });
    expect([g.width, g.height, g.strength]).toEqual([W, W, 0]);
    expect(maxAbs(await pixels(g.png), input)).toBeLessThanOrEqual(1);
  });

  it('SDXL strength 0 returns the input too (scaling factor 0.13025 both ways)', async () => {
    const input = blockPicture(192, 128);
    const g = await new StableDiffusionPipeline(sdxl).generate({ prompt: 'a red circle', image: await png(input, 192, 128), strength: 0, seed: 1 });
    expect([g.width, g.height]).toEqual([192, 128]);
    expect(maxAbs(await pixels(g.png), input)).toBeLessThanOrEqual(1);
  });

  for (const scheduler of SCHEDULER_NAMES) {
    it(`${scheduler}: strength 1 gives the text-to-image picture, whatever the input`, async () => {
      const base: GenerateParams = {
        prompt: 'a green square at the top',
        seed: 4,
        scheduler,
        numSteps: scheduler === 'lcm' ? 4 : 20,
        width: W,
        height: W,
        guidanceScale: 7.5,
      };
      const pipe = new StableDiffusionPipeline(sd);
      const t2i = await pipe.generate(base);
      const i2i = await pipe.generate({ ...base, image: await png(blockPicture()), strength: 1 }, { returnLatents: true });
      const leavesNoise = scheduler === 'pndm' || scheduler === 'ddim';
      expect(meanAbs(await pixels(i2i.png), await pixels(t2i.png))).toBeLessThan(leavesNoise ? 4 : 0.01);
      if (!leavesNoise) expect(maxAbs(i2i.latents!, guidedTargetLatent(base.prompt, '', 7.5, 16, 16))).toBeLessThan(1e-3);
    });
  }

  it('strength 0.5 runs the last half of the steps and still lands on the prompt', async () => {
    const steps: number[] = [];
    const g = await new StableDiffusionPipeline(sd).generate(
      { prompt: 'a blue circle', image: await png(blockPicture()), strength: 0.5, seed: 2, scheduler: 'dpmpp_2m', numSteps: 20, guidanceScale: 3 },
      { returnLatents: true, onProgress: (p) => steps.push(p.totalSteps) },
    );
    // int(20 x 0.5) + steps_offset 1 = 11; the loop starts at 20 - 11 + 1 = 10: ten steps.
    expect(steps[0]).toBe(10);
    expect(maxAbs(g.latents!, guidedTargetLatent('a blue circle', '', 3, 16, 16))).toBeLessThan(1e-3);
  });

  it('SDXL image-to-image lands on the prompt from any input', async () => {
    const g = await new StableDiffusionPipeline(sdxl).generate(
      { prompt: 'a big red circle', image: await png(blockPicture()), strength: 0.6, seed: 3, scheduler: 'euler', numSteps: 10 },
      { returnLatents: true },
    );
    expect(g.strength).toBe(0.6);
    expect(maxAbs(g.latents!, guidedTargetLatent('a big red circle', '', 5, 16, 16))).toBeLessThan(1e-3);
    expect(meanAbs(await pixels(g.png), oracleImage(g.latents!, 16, 16))).toBeLessThan(0.01);
  });
});

describe('legacy 4-channel inpainting', () => {
  it('repaints inside the mask and keeps the input outside it, up to the last timestep’s noise', async () => {
    const input = blockPicture();
    const mask = Buffer.alloc(W * W * 3);
    const inMask = (x: number, y: number) => x >= 32 && x < 96 && y >= 32 && y < 96;
    for (let y = 0; y < W; y++) for (let x = 0; x < W; x++) if (inMask(x, y)) mask.set([255, 255, 255], (y * W + x) * 3);
    const g = await new StableDiffusionPipeline(sd).generate({
      prompt: 'yellow',
      image: await png(input),
      mask: await png(mask),
      strength: 1,
      seed: 6,
      scheduler: 'euler',
      numSteps: 20,
    });
    expect(g.strength).toBe(1);
    const stats = inpaintingStats(await pixels(g.png), input, W, W, inMask, ([r, gr, b]) => r > 240 && gr > 240 && b < 15);
    // The kept latents carry the noise of the last timestep (Euler's sigma 0.029): a few levels.
    expect(stats.keptMeanAbs).toBeLessThan(4);
    expect(stats.paintedShare).toBeGreaterThan(0.999);
  });
});

describe('input checks name the parameter', () => {
  const image = () => png(blockPicture());
  const cases: Array<[string, () => Promise<GenerateParams>, RegExp]> = [
    [
      'a size that differs from width/height',
      async () => ({ prompt: 'x', image: await image(), width: 64, height: 64 }),
      /`image` is 128x128 pixels but `width` and `height` are 64x64; they have to match/,
    ],
    [
      'a mask of another size',
      async () => ({ prompt: 'x', image: await image(), mask: await png(blockPicture(64, 64), 64, 64) }),
      /`mask` is 64x64 pixels but `image` is 128x128; they have to match/,
    ],
    [
      'sides that are not multiples of 8',
      async () => ({ prompt: 'x', image: await png(blockPicture(100, 64), 100, 64) }),
      /`image` is 100x64 pixels; its sides have to be divisible by 8/,
    ],
    ['a mask without an image', async () => ({ prompt: 'x', mask: await image() }), /`mask` needs an `image` to inpaint/],
    ['strength without an image', () => Promise.resolve({ prompt: 'x', strength: 0.5 }), /`strength` applies to image-to-image: give an `image` too/],
    ['strength above 1', async () => ({ prompt: 'x', image: await image(), strength: 1.5 }), /`strength` has to be a number from 0 to 1 but is 1\.5/],
    [
      'bytes that are no picture',
      () => Promise.resolve({ prompt: 'x', image: Buffer.from('not a picture') }),
      /`image` is not a PNG, JPEG or WebP image we can read/,
    ],
  ];
  for (const [label, params, message] of cases) {
    it(label, async () => {
      await expect(new StableDiffusionPipeline(sd).generate(await params())).rejects.toMatchObject({
        name: 'InvalidParamsError',
        message: expect.stringMatching(message) as unknown,
      });
    });
  }

  it('an image for a model exported without its VAE encoder', async () => {
    const d = path.join(dir, 'no-encoder');
    await writeOracleModel(d);
    await rm(path.join(d, 'vae_encoder'), { recursive: true });
    const model = await loadModel(d, { provider: 'cpu' });
    try {
      await expect(new StableDiffusionPipeline(model).generate({ prompt: 'x', image: await image() })).rejects.toMatchObject({
        name: 'InvalidParamsError',
        message: expect.stringMatching(/`image`: this model has no vae_encoder\/model\.onnx/) as unknown,
      });
    } finally {
      await model.release();
    }
  });

  it('a mask with an SDXL model', async () => {
    await expect(new StableDiffusionPipeline(sdxl).generate({ prompt: 'x', image: await image(), mask: await image() })).rejects.toThrow(
      /`mask`: inpainting is not supported for SDXL/,
    );
  });
});

describe('image-to-image on a random-weight model', () => {
  it('is deterministic per seed, depends on the input, and JPEG and WebP inputs work', async () => {
    const modelDir = path.join(dir, 'random');
    await writeRandomModel(modelDir);
    const model = await loadModel(modelDir, { provider: 'cpu' });
    try {
      const pipe = new StableDiffusionPipeline(model);
      const raw = blockPicture(64, 64);
      const base = { prompt: 'a red circle', seed: 8, scheduler: 'ddim' as const, numSteps: 6, strength: 0.7 };
      const a = await pipe.generate({ ...base, image: await png(raw, 64, 64) });
      const b = await pipe.generate({ ...base, image: await png(raw, 64, 64) });
      expect(Buffer.compare(a.png, b.png)).toBe(0);
      const other = await pipe.generate({ ...base, image: await png(Buffer.alloc(raw.length, 200), 64, 64) });
      expect(Buffer.compare(a.png, other.png)).not.toBe(0);
      for (const encoded of [
        await sharp(raw, { raw: { width: 64, height: 64, channels: 3 } })
          .jpeg()
          .toBuffer(),
        await sharp(raw, { raw: { width: 64, height: 64, channels: 3 } })
          .webp()
          .toBuffer(),
      ]) {
        const g = await pipe.generate({ ...base, image: encoded });
        expect([g.width, g.height]).toEqual([64, 64]);
      }
    } finally {
      await model.release();
    }
  });
});
