import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { SCHEDULER_NAMES, type SchedulerName } from '../../src/engine/schedulers/index.js';
import { writeOracleModel, type TestVariant } from '../../src/engine/testmodels/make.js';
import { guidedTargetLatent, oracleImage } from '../../src/engine/testmodels/oracle-spec.js';
import { inpaintingStats, maxAbs, meanAbs } from '../support/pixels.js';

/**
 * The oracle model of each variant (SD 2.x v-prediction, SDXL, SDXL-Turbo, an LCM UNet with a
 * guidance embedding, 9-channel inpainting: see src/engine/testmodels/oracle.ts) through the
 * whole pipeline, for every scheduler: an exact predictor lands on its target, so a wrong input
 * (penultimate layer, pooled embedding, time_ids, guidance embedding, scaling factor, mask
 * channels) shows as a wrong picture.
 */

let dir: string;
const models = new Map<TestVariant, LoadedModel>();
const logs = new Map<TestVariant, string[]>();

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-variant-oracles-'));
  for (const variant of ['sd2-v', 'sdxl', 'sdxl-turbo', 'lcm', 'inpaint'] as const) {
    const modelDir = path.join(dir, variant);
    await writeOracleModel(modelDir, { variant });
    const lines: string[] = [];
    models.set(variant, await loadModel(modelDir, { provider: 'cpu', log: (m) => lines.push(m) }));
    logs.set(variant, lines);
  }
});

afterAll(async () => {
  for (const m of models.values()) await m.release();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const pipe = (v: TestVariant) => new StableDiffusionPipeline(models.get(v)!);

// What PNDM and DDIM leave by design with set_alpha_to_one false: sqrt(1 - abar_0) * eps.
const RESIDUAL_NOISE = Math.sqrt(0.00085);
const E_ABS_NORMAL = Math.sqrt(2 / Math.PI);
const leavesNoise = (s: SchedulerName) => s === 'pndm' || s === 'ddim';
const stepsFor = (s: SchedulerName) => (s === 'lcm' ? 4 : 25);

async function pixels(png: Buffer): Promise<Buffer> {
  return sharp(png).raw().toBuffer();
}

/**
 * The generation's latents and picture against the target latent's. `alphaToOne`: the model's
 * scheduler config sets set_alpha_to_one (LCM's does), so PNDM and DDIM end exactly too.
 */
async function expectLandsOn(
  g: { latents?: Float32Array; png: Buffer },
  target: Float32Array,
  h: number,
  w: number,
  scheduler: SchedulerName,
  alphaToOne = false,
) {
  const noisy = leavesNoise(scheduler) && !alphaToOne;
  if (noisy) {
    expect(meanAbs(g.latents!, target)).toBeCloseTo(RESIDUAL_NOISE * E_ABS_NORMAL, 2);
  } else {
    expect(maxAbs(g.latents!, target)).toBeLessThan(1e-3);
  }
  expect(meanAbs(await pixels(g.png), oracleImage(target, h, w))).toBeLessThan(noisy ? 4 : 0.01);
}

describe('loading says what it found', () => {
  it.each([
    ['sd2-v', /model: SD 2\.x v-prediction \(v-prediction: scheduler_config\.json prediction_type\); defaults: 50 steps, guidance 9, 512x512, scheduler ddim/],
    [
      'sdxl',
      /model: SDXL \(SDXL: text_encoder_2\/ and a UNet taking text_embeds and time_ids\); defaults: 50 steps, guidance 5, 1024x1024, scheduler euler; VAE scaling factor 0\.13025/,
    ],
    [
      'sdxl-turbo',
      /model: SDXL Turbo \(.*turbo: scheduler_config\.json uses trailing timestep spacing.*\); defaults: 1 steps, guidance 0, 512x512, scheduler euler_ancestral/,
    ],
    ['lcm', /model: .* LCM \(LCM: the UNet takes timestep_cond.*\); defaults: 4 steps, guidance 8\.5, 512x512, scheduler lcm/],
    ['inpaint', /model: .* inpainting \(inpainting: the UNet's sample has 9 channels \(declared by the ONNX model\)\)/],
  ] as const)('%s', (variant, line) => {
    expect(logs.get(variant)!.join('\n')).toMatch(line);
  });
});

describe.each(SCHEDULER_NAMES)('oracle variants with %s', (scheduler) => {
  const base = { seed: 5, scheduler, numSteps: stepsFor(scheduler), guidanceScale: 7.5 } satisfies Partial<GenerateParams>;

  it('SD 2.x v-prediction: "a red circle" is a red disc', async () => {
    const g = await pipe('sd2-v').generate({ ...base, prompt: 'a red circle', width: 128, height: 128 }, { returnLatents: true });
    await expectLandsOn(g, guidedTargetLatent('a red circle', '', 7.5, 16, 16), 16, 16, scheduler);
  });

  it('SDXL: colour from the first encoder, shape and place from the second, size from its pooled output, time_ids of a 192x128 picture', async () => {
    const prompt = 'a big yellow square on the left';
    const g = await pipe('sdxl').generate({ ...base, prompt, width: 192, height: 128 }, { returnLatents: true });
    await expectLandsOn(g, guidedTargetLatent(prompt, '', 7.5, 16, 24), 16, 24, scheduler);
  });

  it('LCM: the guidance embedding carries the guidance, with no unconditional batch', async () => {
    const g = await pipe('lcm').generate({ ...base, prompt: 'a blue circle at the top', width: 128, height: 128, guidanceScale: 3 }, { returnLatents: true });
    await expectLandsOn(g, guidedTargetLatent('a blue circle at the top', '', 3, 16, 16), 16, 16, scheduler, true);
    expect(models.get('lcm')!.unet.runs).toBeGreaterThan(0);
  });
});

describe('SDXL conditioning', () => {
  it('an absent negative prompt is zeros (force_zeros_for_empty_prompt), a given one is encoded', async () => {
    const base = { prompt: 'a gray circle', seed: 1, scheduler: 'euler' as const, numSteps: 10, width: 128, height: 128, guidanceScale: 1.5 };
    const plain = await pipe('sdxl').generate(base, { returnLatents: true });
    expect(maxAbs(plain.latents!, guidedTargetLatent('a gray circle', '', 1.5, 16, 16))).toBeLessThan(1e-3);
    const neg = await pipe('sdxl').generate({ ...base, negativePrompt: 'red' }, { returnLatents: true });
    expect(maxAbs(neg.latents!, guidedTargetLatent('a gray circle', 'red', 1.5, 16, 16))).toBeLessThan(1e-3);
  });

  it('Turbo runs one step without guidance by default, at 512x512', async () => {
    const before = models.get('sdxl-turbo')!.unet.runs;
    const g = await pipe('sdxl-turbo').generate({ prompt: 'a red circle', seed: 2 }, { returnLatents: true });
    expect([g.numSteps, g.guidanceScale, g.scheduler, g.width, g.height]).toEqual([1, 0, 'euler_ancestral', 512, 512]);
    // One UNet run: guidance 0 has no unconditional batch.
    expect(models.get('sdxl-turbo')!.unet.runs - before).toBe(1);
    // One trailing step goes from sigma_max straight to the clean estimate.
    expect(maxAbs(g.latents!, guidedTargetLatent('a red circle', '', 0, 64, 64))).toBeLessThan(1e-3);
  });

  it('SDXL defaults to 1024x1024 and guidance 5', async () => {
    const g = await pipe('sdxl').generate({ prompt: 'a green dot', seed: 3, numSteps: 2, scheduler: 'euler' });
    expect([g.width, g.height, g.guidanceScale]).toEqual([1024, 1024, 5]);
  });
});

describe.each(SCHEDULER_NAMES)('9-channel inpainting with %s', (scheduler) => {
  it('paints the prompt inside the mask and keeps the input outside it', async () => {
    // Input: left half blue, right half green; mask: a white 48x48 square in the middle.
    const W = 128;
    const input = Buffer.alloc(W * W * 3);
    const mask = Buffer.alloc(W * W * 3);
    const inMask = (x: number, y: number) => x >= 40 && x < 88 && y >= 40 && y < 88;
    for (let y = 0; y < W; y++) {
      for (let x = 0; x < W; x++) {
        input.set(x < 64 ? [0, 0, 255] : [0, 255, 0], (y * W + x) * 3);
        if (inMask(x, y)) mask.set([255, 255, 255], (y * W + x) * 3);
      }
    }
    const png = (raw: Buffer) =>
      sharp(raw, { raw: { width: W, height: W, channels: 3 } })
        .png()
        .toBuffer();
    const g = await pipe('inpaint').generate({
      prompt: 'red',
      image: await png(input),
      mask: await png(mask),
      seed: 9,
      scheduler,
      numSteps: stepsFor(scheduler),
      guidanceScale: 7.5,
    });
    const stats = inpaintingStats(await pixels(g.png), input, W, W, inMask, ([r, gr, b]) => r > 240 && gr < 15 && b < 15);
    // Outside the mask: the input, exactly for schedulers that end at sigma 0.
    expect(stats.keptMeanAbs).toBeLessThan(leavesNoise(scheduler) ? 4 : 0.01);
    expect(stats.paintedShare).toBeGreaterThan(leavesNoise(scheduler) ? 0.9 : 0.999);
  });
});
