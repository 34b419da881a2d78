import { describe, expect, it } from 'vitest';
import { TorchGenerator } from '../../src/engine/random.js';
import { DdimScheduler } from '../../src/engine/schedulers/ddim.js';
import { LcmScheduler } from '../../src/engine/schedulers/lcm.js';
import { PndmScheduler } from '../../src/engine/schedulers/pndm.js';
import type { NoiseSource, Scheduler, SchedulerConfig } from '../../src/engine/schedulers/types.js';
import { SD15_SCHEDULER_CONFIG } from '../../src/engine/testmodels/make.js';

/**
 * Reference numbers come from diffusers' own scheduler tests (tests/schedulers/
 * test_scheduler_{pndm,ddim,lcm}.py): a fake model eps(x, t) = x * t / (t + 1) run over the
 * deterministic 4x3x8x8 sample, checking sum |x| and mean |x| at the end with diffusers'
 * tolerances.
 */

/** Stable Diffusion 1.5's scheduler_config.json (the same file the test models ship). */
const SD15_CONFIG: SchedulerConfig = SD15_SCHEDULER_CONFIG;

const [B, C, H, W] = [4, 3, 8, 8];
const NUM = B * C * H * W;

/**
 * diffusers' dummy_sample_deter (and, reversed, dummy_noise_deter): arange(768) reshaped to
 * (C, H, W, B), divided by 768, permuted to (B, C, H, W). Returned in logical NCHW order, which
 * matters wherever noise is added element by element.
 */
function deterSample(flip = false): Float32Array {
  const out = new Float32Array(NUM);
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++)
      for (let h = 0; h < H; h++)
        for (let w = 0; w < W; w++) {
          const k = c * H * W * B + h * W * B + w * B + b;
          out[((b * C + c) * H + h) * W + w] = (flip ? NUM - 1 - k : k) / NUM;
        }
  return out;
}

/** diffusers' dummy_model, in float32 like torch: sample * t / (t + 1). */
function dummyModel(sample: Float32Array, t: number): Float32Array {
  const out = new Float32Array(sample.length);
  for (let i = 0; i < out.length; i++) out[i] = Math.fround(sample[i]! * t) / (t + 1);
  return out;
}

function fullLoop(scheduler: Scheduler, steps: number, noise?: NoiseSource, start = deterSample()): Float32Array {
  scheduler.setTimesteps(steps);
  let sample = start;
  for (const t of scheduler.timesteps) {
    sample = scheduler.step(dummyModel(scheduler.scaleModelInput(sample, t), t), t, sample, noise);
  }
  return sample;
}

function absStats(x: Float32Array): { sum: number; mean: number } {
  let sum = 0;
  for (const v of x) sum += Math.abs(v);
  return { sum, mean: sum / x.length };
}

function expectStats(x: Float32Array, sum: number, mean: number, sumTol = 1e-2, meanTol = 1e-3): void {
  const s = absStats(x);
  expect(Math.abs(s.sum - sum), `sum |x| = ${s.sum}, expected ${sum}`).toBeLessThan(sumTol);
  expect(Math.abs(s.mean - mean), `mean |x| = ${s.mean}, expected ${mean}`).toBeLessThan(meanTol);
}

const ints = (a: Float64Array) => Array.from(a);

/**
 * alphas_cumprod of a scaled_linear schedule, computed here in float64 from the config
 * (betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2), independent of the engine's code.
 */
function scaledLinearAlphasCumprod(config: SchedulerConfig): Float64Array {
  const T = config.num_train_timesteps!;
  const [lo, hi] = [Math.sqrt(config.beta_start!), Math.sqrt(config.beta_end!)];
  const out = new Float64Array(T);
  let prod = 1;
  for (let i = 0; i < T; i++) {
    const beta = (lo + ((hi - lo) * i) / (T - 1)) ** 2;
    prod *= 1 - beta;
    out[i] = prod;
  }
  return out;
}

describe('deterministic test fixtures', () => {
  it('match diffusers dummy_sample_deter layout', () => {
    const s = deterSample();
    // [b=1, c=0, h=0, w=0] is arange index 1; [b=0, c=1, h=0, w=0] is index 256.
    expect(s[C * H * W]).toBe(Math.fround(1 / 768));
    expect(s[H * W]).toBe(Math.fround(256 / 768));
    expect(absStats(s).sum).toBeCloseTo(767 / 2, 6);
  });
});

describe('PndmScheduler', () => {
  // diffusers PNDMSchedulerTest.get_scheduler_config
  const base: SchedulerConfig = { num_train_timesteps: 1000, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' };

  it('gives SD 1.5 its PLMS timesteps, second one repeated', () => {
    const s = new PndmScheduler(SD15_CONFIG);
    s.setTimesteps(50);
    const ts = ints(s.timesteps);
    expect(ts.slice(0, 5)).toEqual([981, 961, 961, 941, 921]);
    expect(ts.slice(-3)).toEqual([41, 21, 1]);
    expect(ts).toHaveLength(51);
    expect(s.prkTimesteps).toHaveLength(0);
  });

  it('matches test_steps_offset timesteps with the PRK warm-up', () => {
    const s = new PndmScheduler({ ...base, steps_offset: 1 });
    s.setTimesteps(10);
    expect(ints(s.timesteps)).toEqual([901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1]);
    expect(s.prkTimesteps).toHaveLength(12);
  });

  it('applies PNDM defaults for missing keys and ignores unknown ones', () => {
    const s = new PndmScheduler({ _class_name: 'PNDMScheduler', _diffusers_version: '0.6.0' });
    expect(s.config).toMatchObject({
      beta_start: 0.0001,
      beta_schedule: 'linear',
      skip_prk_steps: false,
      set_alpha_to_one: false,
      steps_offset: 0,
      prediction_type: 'epsilon',
    });
    expect(new PndmScheduler(SD15_CONFIG).config).toMatchObject({ beta_schedule: 'scaled_linear', skip_prk_steps: true, steps_offset: 1 });
  });

  it('full loop, no noise (test_full_loop_no_noise)', () => {
    expectStats(fullLoop(new PndmScheduler(base), 10), 198.1318, 0.258);
  });

  it('full loop with v_prediction', () => {
    expectStats(fullLoop(new PndmScheduler({ ...base, prediction_type: 'v_prediction' }), 10), 67.3986, 0.0878);
  });

  it('full loop with set_alpha_to_one', () => {
    expectStats(fullLoop(new PndmScheduler({ ...base, set_alpha_to_one: true, beta_start: 0.01 }), 10), 230.0399, 0.2995);
  });

  it('full loop without set_alpha_to_one', () => {
    expectStats(fullLoop(new PndmScheduler({ ...base, set_alpha_to_one: false, beta_start: 0.01 }), 10), 186.9482, 0.2434);
  });

  it('runs SD 1.5 PLMS with few steps (skip_prk_steps allows n < 4), exactly along the trajectory of a constant-noise model', () => {
    // A model whose data prediction is always `target` answers the same eps at every point of
    // the exact trajectory x_t = sqrt(abar_t) * target + sqrt(1 - abar_t) * eps. PLMS combines
    // eps values with weights that sum to 1, so it follows that trajectory and ends at
    // SD 1.5's final alpha (set_alpha_to_one false: abar_0), for any number of steps.
    const abar = scaledLinearAlphasCumprod(SD15_CONFIG);
    const target = deterSample(true);
    for (const n of [1, 2, 3, 4, 10]) {
      const s = new PndmScheduler(SD15_CONFIG);
      s.setTimesteps(n);
      const start = deterSample();
      const t0 = s.timesteps[0]!;
      const eps = start.map((x, k) => (x - Math.sqrt(abar[t0]!) * target[k]!) / Math.sqrt(1 - abar[t0]!));
      let x = start;
      for (const t of s.timesteps) {
        const model = x.map((xk, k) => (xk - Math.sqrt(abar[t]!) * target[k]!) / Math.sqrt(1 - abar[t]!));
        x = s.step(model, t, x);
      }
      const expected = Array.from(target, (v, k) => Math.sqrt(abar[0]!) * v + Math.sqrt(1 - abar[0]!) * eps[k]!);
      let worst = 0;
      for (let k = 0; k < x.length; k++) worst = Math.max(worst, Math.abs(x[k]! - expected[k]!));
      expect(worst, `n=${n}`).toBeLessThan(1e-5);
    }
    const s = new PndmScheduler(SD15_CONFIG);
    s.setTimesteps(2);
    expect(ints(s.timesteps)).toEqual([501, 1, 1]);
  });

  it('rejects PRK with fewer than 4 steps and bad configs', () => {
    const s = new PndmScheduler(base);
    for (const n of [1, 2, 3]) expect(() => s.setTimesteps(n)).toThrow(/must be >= 4/);
    expect(() => s.setTimesteps(4)).not.toThrow();
    expect(() => new PndmScheduler({ beta_schedule: 'cosine' as never })).toThrow(/beta_schedule "cosine"/);
    expect(() => new PndmScheduler({ prediction_type: 'sample' })).toThrow(/prediction_type/);
  });
});

describe('DdimScheduler', () => {
  // diffusers DDIMSchedulerTest.get_scheduler_config
  const base: SchedulerConfig = { num_train_timesteps: 1000, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear', clip_sample: true };

  it('matches test_steps_offset timesteps', () => {
    const s = new DdimScheduler({ ...base, steps_offset: 1 });
    s.setTimesteps(5);
    expect(ints(s.timesteps)).toEqual([801, 601, 401, 201, 1]);
  });

  it('spaces trailing and linspace timesteps like numpy (round half to even)', () => {
    const trailing = new DdimScheduler({ timestep_spacing: 'trailing', steps_offset: 1 });
    trailing.setTimesteps(16);
    // 1000 - 62.5k ties: 937.5 -> 938, 812.5 -> 812. steps_offset is ignored here.
    expect(ints(trailing.timesteps)).toEqual([999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61]);
    trailing.setTimesteps(7);
    expect(ints(trailing.timesteps)).toEqual([999, 856, 713, 570, 428, 285, 142]);
    const linspace = new DdimScheduler({ timestep_spacing: 'linspace' });
    linspace.setTimesteps(16);
    expect(ints(linspace.timesteps)).toEqual([999, 932, 866, 799, 733, 666, 599, 533, 466, 400, 333, 266, 200, 133, 67, 0]);
  });

  it('never hands out timestep -1 where numpy arange overshoots (trailing, 61 steps)', () => {
    const s = new DdimScheduler({ timestep_spacing: 'trailing' });
    s.setTimesteps(61);
    expect(s.timesteps).toHaveLength(61);
    expect(ints(s.timesteps).slice(-3)).toEqual([48, 32, 15]);
  });

  it('applies DDIM defaults (clip_sample and set_alpha_to_one on) unless the config says otherwise', () => {
    expect(new DdimScheduler().config).toMatchObject({
      clip_sample: true,
      set_alpha_to_one: true,
      steps_offset: 0,
      timestep_spacing: 'leading',
      beta_schedule: 'linear',
    });
    expect(new DdimScheduler(SD15_CONFIG).config).toMatchObject({
      clip_sample: false,
      set_alpha_to_one: false,
      steps_offset: 1,
      beta_schedule: 'scaled_linear',
    });
  });

  it('full loop, no noise (test_full_loop_no_noise)', () => {
    expectStats(fullLoop(new DdimScheduler(base), 10), 172.0067, 0.223967);
  });

  it('full loop with v_prediction', () => {
    expectStats(fullLoop(new DdimScheduler({ ...base, prediction_type: 'v_prediction' }), 10), 52.5302, 0.0684);
  });

  it('full loop with set_alpha_to_one', () => {
    expectStats(fullLoop(new DdimScheduler({ ...base, set_alpha_to_one: true, beta_start: 0.01 }), 10), 149.8295, 0.1951);
  });

  it('full loop without set_alpha_to_one', () => {
    expectStats(fullLoop(new DdimScheduler({ ...base, set_alpha_to_one: false, beta_start: 0.01 }), 10), 149.0784, 0.1941);
  });

  it('full loop from a noised sample (test_full_loop_with_noise)', () => {
    const s = new DdimScheduler(base);
    s.setTimesteps(10);
    const timesteps = s.timesteps.slice(8);
    let sample = s.addNoise(deterSample(), deterSample(true), timesteps[0]!);
    for (const t of timesteps) sample = s.step(dummyModel(sample, t), t, sample);
    expectStats(sample, 354.5418, 0.4616);
  });

  it('does not mutate its inputs and returns fresh arrays', () => {
    const s = new DdimScheduler(SD15_CONFIG);
    s.setTimesteps(10);
    const sample = deterSample();
    const eps = dummyModel(sample, 901);
    const [sampleCopy, epsCopy] = [sample.slice(), eps.slice()];
    const scaled = s.scaleModelInput(sample, 901);
    expect(scaled).not.toBe(sample);
    expect(scaled).toEqual(sample);
    const out = s.step(eps, 901, sample);
    expect(out).not.toBe(sample);
    expect(sample).toEqual(sampleCopy);
    expect(eps).toEqual(epsCopy);
  });

  it('rejects invalid settings with a message naming them', () => {
    const s = new DdimScheduler();
    expect(() => s.step(new Float32Array(4), 1, new Float32Array(4))).toThrow(/setTimesteps/);
    expect(() => s.setTimesteps(0)).toThrow(/>= 1/);
    expect(() => s.setTimesteps(1001)).toThrow(/exceeds num_train_timesteps 1000/);
    expect(() => new DdimScheduler({ timestep_spacing: 'karras' as never })).toThrow(/timestep_spacing "karras"/);
    expect(() => new DdimScheduler({ num_train_timesteps: 0 })).toThrow(/num_train_timesteps/);
    expect(() => new DdimScheduler({ thresholding: true })).toThrow(/thresholding/);
    s.setTimesteps(10);
    expect(() => s.step(new Float32Array(4), 1000, new Float32Array(4))).toThrow(/timestep 1000/);
    expect(() => s.step(new Float32Array(3), 900, new Float32Array(4))).toThrow(/3 values/);
  });
});

describe('LcmScheduler', () => {
  // diffusers LCMSchedulerTest.get_scheduler_config
  const base: SchedulerConfig = { num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', prediction_type: 'epsilon' };

  it('picks timesteps from the 50-step distillation schedule', () => {
    const s = new LcmScheduler(base);
    s.setTimesteps(4);
    expect(ints(s.timesteps)).toEqual([999, 759, 499, 259]);
    s.setTimesteps(10);
    expect(ints(s.timesteps)).toEqual([999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    s.setTimesteps(1);
    expect(ints(s.timesteps)).toEqual([999]);
  });

  it('applies LCM defaults', () => {
    expect(new LcmScheduler().config).toMatchObject({
      beta_start: 0.00085,
      beta_end: 0.012,
      beta_schedule: 'scaled_linear',
      original_inference_steps: 50,
      timestep_scaling: 10,
      set_alpha_to_one: true,
      clip_sample: false,
      prediction_type: 'epsilon',
    });
    expect(new LcmScheduler({ original_inference_steps: 100 }).config.original_inference_steps).toBe(100);
  });

  it('full loop, one step (test_full_loop_onestep)', () => {
    expectStats(fullLoop(new LcmScheduler(base), 1), 18.7097, 0.0244, 1e-3, 1e-3);
  });

  it('full loop, 10 steps with torch.manual_seed(0) noise (test_full_loop_multistep)', () => {
    expectStats(fullLoop(new LcmScheduler(base), 10, new TorchGenerator(0)), 197.7616, 0.2575, 1e-3, 1e-3);
  });

  it('needs noise between steps but not on the last one', () => {
    const s = new LcmScheduler(base);
    s.setTimesteps(2);
    const x = deterSample();
    expect(() => s.step(dummyModel(x, 999), 999, x)).toThrow(/needs a NoiseSource/);
    s.setTimesteps(2);
    const zeros: NoiseSource = { randn: (n) => new Float32Array(n) };
    const mid = s.step(dummyModel(x, 999), 999, x, zeros);
    expect(() => s.step(dummyModel(mid, 499), 499, mid)).not.toThrow();
  });

  it('rejects step counts its schedule cannot serve', () => {
    const s = new LcmScheduler(base);
    expect(() => s.setTimesteps(51)).toThrow(/original_inference_steps 50/);
    expect(() => s.setTimesteps(0)).toThrow(/>= 1/);
    expect(() => new LcmScheduler({ original_inference_steps: 2000 })).toThrow(/original_inference_steps/);
    s.setTimesteps(4);
    expect(() => s.step(new Float32Array(4), 500, new Float32Array(4))).toThrow(/timestep 500 is not in the schedule/);
  });
});
