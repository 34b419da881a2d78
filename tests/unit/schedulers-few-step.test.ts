import { describe, expect, it } from 'vitest';
import { NumpyRandomState } from '../../src/engine/random.js';
import { noiseSchedule } from '../../src/engine/schedulers/betas.js';
import { createScheduler, SCHEDULER_NAMES, type SchedulerConfig } from '../../src/engine/schedulers/index.js';

/**
 * What the few-step models and image-to-image ask of the schedulers: trailing spacing for one to
 * four steps (SD-Turbo, SDXL-Turbo), LCM's four-step subset, and an addNoise that agrees with the
 * UNet-input scaling for every scheduler (image-to-image noises with one, then steps with the other).
 */

// SD 1.5 / SDXL's training schedule.
const SD: SchedulerConfig = { beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', num_train_timesteps: 1000, steps_offset: 1 };

describe('trailing spacing for turbo models', () => {
  it.each([
    [1, [999]],
    [2, [999, 499]],
    [4, [999, 749, 499, 249]],
  ])('%i steps: timesteps %j (np.arange(1000, 0, -1000 / n).round() - 1)', (n, expected) => {
    for (const name of ['euler', 'euler_ancestral', 'ddim'] as const) {
      const s = createScheduler(name, { ...SD, timestep_spacing: 'trailing' });
      s.setTimesteps(n);
      expect(Array.from(s.timesteps)).toEqual(expected);
    }
  });

  it('gives exactly n finite timesteps for every n from 1 to 150, for every scheduler that has a timestep_spacing (n = 61 once gave an extra -1 and NaN)', () => {
    const bad: string[] = [];
    for (const name of SCHEDULER_NAMES) {
      if (name === 'pndm' || name === 'lcm') continue;
      const s = createScheduler(name, { ...SD, timestep_spacing: 'trailing' });
      for (let n = 1; n <= 150; n++) {
        s.setTimesteps(n);
        const ts = Array.from(s.timesteps);
        if (ts.length !== n || ts.some((t) => !Number.isFinite(t) || t < 0) || !Number.isFinite(s.initNoiseSigma))
          bad.push(`${name} n=${n}: ${ts.length} timesteps`);
        const x = new Float32Array(4).fill(1);
        const scaled = s.scaleModelInput(x, ts.at(-1)!);
        if (!Array.from(scaled).every(Number.isFinite)) bad.push(`${name} n=${n}: non-finite model input at the last step`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('starts at the largest training noise level (sigma 14.6146)', () => {
    const s = createScheduler('euler_ancestral', { ...SD, timestep_spacing: 'trailing' });
    s.setTimesteps(1);
    expect(s.initNoiseSigma).toBeCloseTo(14.6146, 4);
  });

  it('one trailing step of Euler ancestral with an exact predictor lands on the clean sample, adding no noise', () => {
    const s = createScheduler('euler_ancestral', { ...SD, timestep_spacing: 'trailing' });
    s.setTimesteps(1);
    const x0 = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i));
    const noise = new NumpyRandomState(0).randn(64);
    const t = s.timesteps[0]!;
    const x = x0.map((v, i) => v + s.initNoiseSigma * noise[i]!);
    const eps = noise; // exact: x = x0 + sigma * eps
    const out = s.step(eps, t, x, new NumpyRandomState(1));
    for (let i = 0; i < 64; i++) expect(out[i]).toBeCloseTo(x0[i]!, 4);
  });
});

describe("LCM's few-step subset of the 50-step distillation schedule", () => {
  it.each([
    [1, [999]],
    [2, [999, 499]],
    [4, [999, 759, 499, 259]],
  ])('%i steps: %j', (n, expected) => {
    const s = createScheduler('lcm', { ...SD, original_inference_steps: 50 });
    s.setTimesteps(n);
    expect(Array.from(s.timesteps)).toEqual(expected);
  });
});

describe('addNoise agrees with the UNet-input scaling, for every scheduler', () => {
  // Whatever a scheduler's latent space (VP for DDPM-family and DPM-Solver, x0 + sigma eps for the
  // Euler family), the UNet must see sqrt(abar) x0 + sqrt(1 - abar) eps at that timestep.
  for (const name of SCHEDULER_NAMES) {
    it(name, () => {
      const x0 = Float32Array.from({ length: 32 }, (_, i) => Math.cos(i) * 0.8);
      const eps = new NumpyRandomState(3).randn(32);
      const { alphasCumprod } = noiseSchedule({ num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear' });
      for (const k of [0, 4]) {
        // A fresh scheduler each time: the sigma-family ones take their step index from the
        // first timestep they see, as image-to-image's first step does.
        const s = createScheduler(name, SD);
        s.setTimesteps(10);
        const t = s.timesteps[k]!;
        const c = coefficients(s.scaleModelInput(s.addNoise(x0, eps, t), t), x0, eps);
        // The x0 and eps coefficients are sqrt(abar) and sqrt(1 - abar): their squares sum to 1 ...
        expect(c.x0 ** 2 + c.eps ** 2).toBeCloseTo(1, 4);
        // ... and at integer timesteps abar is the training schedule's (DPM++ 2M Karras steps
        // through Karras sigmas between them and tells the UNet the nearest timestep).
        if (Number.isInteger(t) && name !== 'dpmpp_2m') expect(c.x0).toBeCloseTo(Math.sqrt(alphasCumprod[t]!), 4);
      }
    });
  }
});

/** Least-squares coefficients of `v` on x0 and eps (the two are nearly orthogonal here). */
function coefficients(v: Float32Array, x0: Float32Array, eps: Float32Array): { x0: number; eps: number } {
  let xx = 0;
  let ee = 0;
  let xe = 0;
  let vx = 0;
  let ve = 0;
  for (let i = 0; i < v.length; i++) {
    xx += x0[i]! * x0[i]!;
    ee += eps[i]! * eps[i]!;
    xe += x0[i]! * eps[i]!;
    vx += v[i]! * x0[i]!;
    ve += v[i]! * eps[i]!;
  }
  const det = xx * ee - xe * xe;
  return { x0: (vx * ee - ve * xe) / det, eps: (ve * xx - vx * xe) / det };
}
