import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type LoadedModel } from '../../src/engine/model.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { readPngText } from '../../src/engine/png.js';
import { SCHEDULER_NAMES, type SchedulerName } from '../../src/engine/schedulers/index.js';
import { writeOracleModel } from '../../src/engine/testmodels/make.js';
import { COLOURS, guidedTargetLatent, oracleImage } from '../../src/engine/testmodels/oracle-spec.js';
import { centroidOf, maxAbs, meanAbs } from '../support/pixels.js';

/**
 * The whole pipeline against the oracle model, whose UNet is the exact noise predictor for a
 * known target latent: every correct scheduler must land on it.
 */

let dir: string;
let model: LoadedModel;
let pipe: StableDiffusionPipeline;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-oracle-'));
  await writeOracleModel(path.join(dir, 'oracle'));
  model = await loadModel(path.join(dir, 'oracle'), { provider: 'cpu' });
  pipe = new StableDiffusionPipeline(model);
});

afterAll(async () => {
  await model?.release();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function pixels(png: Buffer): Promise<{ data: Buffer; width: number; height: number }> {
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  expect(info.channels).toBe(3);
  return { data, width: info.width, height: info.height };
}

// sqrt(1 - abar_0) for SD 1.5's schedule: what PNDM and DDIM leave of the noise by design
// (set_alpha_to_one false: the last step lands on alphas_cumprod[0], not on 1).
const RESIDUAL_NOISE = Math.sqrt(1 - (1 - 0.00085));
const E_ABS_NORMAL = Math.sqrt(2 / Math.PI);

describe('oracle model: every scheduler lands on the target', () => {
  const stepsFor = (s: SchedulerName) => (s === 'lcm' ? 4 : 25);
  for (const scheduler of SCHEDULER_NAMES) {
    it(`${scheduler}: "a red circle" is a red disc on the background`, async () => {
      const params: GenerateParams = { prompt: 'a red circle', seed: 7, scheduler, numSteps: stepsFor(scheduler), width: 128, height: 128, guidanceScale: 7.5 };
      const g = await pipe.generate(params, { returnLatents: true });
      const target = guidedTargetLatent('a red circle', '', 7.5, 16, 16);
      if (scheduler === 'pndm' || scheduler === 'ddim') {
        // The leftover is sqrt(1 - abar_0) * eps: mean |eps| is sqrt(2/pi) for standard normal noise.
        expect(meanAbs(g.latents!, target)).toBeCloseTo(RESIDUAL_NOISE * E_ABS_NORMAL, 2);
        expect(maxAbs(g.latents!, target)).toBeLessThan(RESIDUAL_NOISE * 5);
      } else {
        // The Euler family and DPM-Solver++ end at sigma = 0; LCM's boundary condition returns x0.
        expect(maxAbs(g.latents!, target)).toBeLessThan(1e-3);
      }
      const img = await pixels(g.png);
      const expected = oracleImage(target, 16, 16);
      expect(meanAbs(img.data, expected)).toBeLessThan(scheduler === 'pndm' || scheduler === 'ddim' ? 4 : 0.01);
      // The disc's centre is saturated red (guidance pushes it past the clamp); corners are background.
      const at = (x: number, y: number) => Array.from(img.data.subarray((y * 128 + x) * 3, (y * 128 + x) * 3 + 3));
      const [r, gg, b] = at(64, 64);
      expect(r).toBeGreaterThan(240);
      expect(gg).toBeLessThan(15);
      expect(b).toBeLessThan(15);
      for (const [x, y] of [
        [2, 2],
        [125, 2],
        [2, 125],
        [125, 125],
      ] as const) {
        for (const v of at(x, y)) expect(Math.abs(v - 102)).toBeLessThan(16);
      }
    });
  }
});

describe('oracle model: geometry, guidance and negative prompts', () => {
  it('puts "a blue square on the left" in the left half of a wide image (no transposed axes)', async () => {
    const g = await pipe.generate({ prompt: 'a blue square on the left', seed: 1, scheduler: 'euler', numSteps: 20, width: 256, height: 128 });
    const img = await pixels(g.png);
    expect([img.width, img.height]).toEqual([256, 128]);
    const c = centroidOf(img, [0, 0, 255]);
    expect(c.x).toBeCloseTo(0.25, 1);
    expect(c.y).toBeCloseTo(0.5, 1);
    expect(c.fraction).toBeGreaterThan(0.05);
  });

  it('puts "a yellow circle at the top" in the top half', async () => {
    const g = await pipe.generate({ prompt: 'a yellow circle at the top', seed: 2, scheduler: 'dpmpp_2m', numSteps: 20, width: 128, height: 256 });
    const c = centroidOf(await pixels(g.png), [255, 255, 0]);
    expect(c.x).toBeCloseTo(0.5, 1);
    expect(c.y).toBeCloseTo(0.25, 1);
  });

  it('with guidance 1 (no classifier-free guidance) reproduces the colour exactly', async () => {
    const g = await pipe.generate({ prompt: 'a purple square', seed: 3, scheduler: 'euler', numSteps: 10, width: 128, height: 128, guidanceScale: 1 });
    const img = await pixels(g.png);
    const i = (64 * 128 + 64) * 3;
    const expected = COLOURS.purple!.map((v) => Math.round((v / 2 + 0.5) * 255));
    expect(Array.from(img.data.subarray(i, i + 3))).toEqual(expected);
  });

  it('a negative prompt moves the colour away from it, as guidance predicts', async () => {
    const base = { prompt: 'a gray circle', seed: 4, scheduler: 'euler' as const, numSteps: 15, width: 128, height: 128, guidanceScale: 1.5 };
    const plain = await pipe.generate(base, { returnLatents: true });
    const neg = await pipe.generate({ ...base, negativePrompt: 'red' }, { returnLatents: true });
    expect(maxAbs(neg.latents!, guidedTargetLatent('a gray circle', 'red', 1.5, 16, 16))).toBeLessThan(1e-3);
    const centre = async (png: Buffer) => {
      const img = await pixels(png);
      const i = (64 * 128 + 64) * 3;
      return Array.from(img.data.subarray(i, i + 3));
    };
    const [r0, g0, b0] = await centre(plain.png);
    const [r1, g1, b1] = await centre(neg.png);
    // Away from red: less red, more green and blue than the same prompt without the negative.
    expect(r1).toBeLessThan(r0!);
    expect(g1).toBeGreaterThanOrEqual(g0!);
    expect(b1).toBeGreaterThanOrEqual(b0!);
    // T_u + g (T_c - T_u) in the disc: red + 1.5 (gray - red) = (-0.5, 0.5, 0.5).
    expect([r1, g1, b1]).toEqual([64, 191, 191]);
  });
});

describe('pipeline contract', () => {
  it('is deterministic: the same seed twice gives a byte-identical PNG', async () => {
    const params = { prompt: 'a green dot', seed: 12345, scheduler: 'euler_ancestral' as const, numSteps: 8, width: 128, height: 128 };
    const a = await pipe.generate(params);
    const b = await pipe.generate(params);
    expect(Buffer.compare(a.png, b.png)).toBe(0);
  });

  it('draws a seed when none is given and reports it; reusing it reproduces the image', async () => {
    const a = await pipe.generate({ prompt: 'a pink square', scheduler: 'ddim', numSteps: 5, width: 64, height: 64 });
    expect(Number.isInteger(a.seed)).toBe(true);
    expect(a.seed).toBeGreaterThanOrEqual(0);
    expect(a.seed).toBeLessThanOrEqual(2 ** 32 - 1);
    const b = await pipe.generate({ prompt: 'a pink square', scheduler: 'ddim', numSteps: 5, width: 64, height: 64, seed: a.seed });
    expect(Buffer.compare(a.png, b.png)).toBe(0);
  });

  it('uses the textbook defaults: 512x512, 50 steps, guidance 9, the model scheduler (PNDM)', async () => {
    const g = await pipe.generate({ prompt: 'a cyan circle', seed: 1 });
    expect([g.width, g.height, g.numSteps, g.guidanceScale, g.scheduler]).toEqual([512, 512, 50, 9, 'pndm']);
  });

  it('carries the generation parameters as PNG text', async () => {
    const g = await pipe.generate({
      prompt: 'a red circle — ünïcode',
      negativePrompt: 'blue',
      seed: 99,
      scheduler: 'euler',
      numSteps: 3,
      width: 64,
      height: 64,
    });
    const text = readPngText(g.png);
    expect(text).toMatchObject({
      prompt: 'a red circle — ünïcode',
      negative_prompt: 'blue',
      seed: '99',
      scheduler: 'euler',
      num_steps: '3',
      guidance_scale: '9',
      size: '64x64',
      model: 'oracle',
    });
    expect(text.parameters).toContain('Seed: 99');
  });

  it('reports progress for every step, with previews when asked', async () => {
    const seen: Array<{ step: number; totalSteps: number; preview: boolean }> = [];
    await pipe.generate(
      { prompt: 'a red circle', seed: 1, scheduler: 'euler', numSteps: 6, width: 64, height: 64 },
      { previewEvery: 3, onProgress: (p) => seen.push({ step: p.step, totalSteps: p.totalSteps, preview: !!p.preview }) },
    );
    expect(seen.map((s) => s.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(seen.every((s) => s.totalSteps === 6)).toBe(true);
    expect(seen.filter((s) => s.preview).map((s) => s.step)).toEqual([3, 6]);
  });

  it('stops between steps when the signal is aborted', async () => {
    const controller = new AbortController();
    let last = 0;
    const run = pipe.generate(
      { prompt: 'a red circle', seed: 1, scheduler: 'euler', numSteps: 30, width: 64, height: 64 },
      {
        signal: controller.signal,
        onProgress: (p) => {
          last = p.step;
          if (p.step === 3) controller.abort();
        },
      },
    );
    await expect(run).rejects.toMatchObject({ name: 'AbortError' });
    expect(last).toBe(3);
  });

  it('warns with the dropped text when a prompt is longer than 75 tokens', async () => {
    const long = Array.from({ length: 80 }, (_, i) => (i % 2 ? 'red' : 'circle')).join(' ');
    const g = await pipe.generate({ prompt: `${long} blue`, seed: 1, scheduler: 'euler', numSteps: 2, width: 64, height: 64 });
    expect(g.warnings).toHaveLength(1);
    expect(g.warnings[0]).toMatch(/prompt truncated to 75 tokens: 6 tokens dropped \("red circle red circle red blue"\)/);
  });

  it('rejects impossible parameters with messages that name them', async () => {
    const bad: Array<[Partial<GenerateParams>, RegExp]> = [
      [{ width: 500 }, /`height` and `width` have to be divisible by 8 but are 512 and 500/],
      [{ numSteps: 0 }, /`num_steps` has to be an integer from 1 to 150 but is 0/],
      [{ guidanceScale: Number.NaN }, /`guidance_scale` has to be a number/],
      [{ seed: -1 }, /`seed` has to be an integer from 0 to 4294967295 but is -1/],
      [{ seed: 2 ** 32 }, /`seed` has to be an integer from 0 to 4294967295/],
      [{ scheduler: 'lms' as SchedulerName }, /`scheduler` has to be one of pndm, ddim, euler, euler_ancestral, dpmpp_2m, lcm but is lms/],
    ];
    for (const [override, message] of bad) {
      await expect(pipe.generate({ prompt: 'x', ...override })).rejects.toThrow(message);
    }
  });
});
