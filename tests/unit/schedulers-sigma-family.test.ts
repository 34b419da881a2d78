/**
 * Euler, Euler ancestral and DPM-Solver++ multistep against diffusers.
 *
 * The full-loop numbers are diffusers' own (tests/schedulers/test_scheduler_euler.py,
 * test_scheduler_euler_ancestral.py, test_scheduler_dpm_multi.py), with their configs,
 * their fake model `model(x, t) = x * t / (t + 1)`, their deterministic sample and their
 * tolerances.
 *
 * The SD 1.5 schedule lists come from a numpy transcription of diffusers' set_timesteps run
 * on SD 1.5's scheduler_config.json, with the training schedule rounded as torch rounds it
 * (float32 betas and alphas, cumprod accumulated in double, float32 sigmas). Integer
 * timesteps must match exactly and sigmas to about one float32 ulp.
 */
import { describe, expect, it } from 'vitest';
import { DdimScheduler } from '../../src/engine/schedulers/ddim.js';
import { DpmSolverMultistepScheduler } from '../../src/engine/schedulers/dpm-solver.js';
import { EulerAncestralScheduler } from '../../src/engine/schedulers/euler-ancestral.js';
import { EulerDiscreteScheduler } from '../../src/engine/schedulers/euler.js';
import type { NoiseSource, Scheduler, SchedulerConfig } from '../../src/engine/schedulers/types.js';
import { TorchGenerator } from '../../src/engine/random.js';
import { SD15_SCHEDULER_CONFIG } from '../../src/engine/testmodels/make.js';

// ---- diffusers' test fixtures (tests/schedulers/test_schedulers.py) -------------------------

const B = 4,
  C = 3,
  H = 8,
  W = 8;
const NUM = B * C * H * W;

/**
 * arange(768) laid out as (C, H, W, B), divided by 768 and permuted to (B, C, H, W); `flip`
 * gives dummy_noise_deter (the arange reversed). Element order matters for the ancestral
 * sampler, whose noise is drawn in (B, C, H, W) row-major order.
 */
function deterministic(flip: boolean): Float32Array {
  const out = new Float32Array(NUM);
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++)
      for (let h = 0; h < H; h++)
        for (let w = 0; w < W; w++) {
          const k = ((c * H + h) * W + w) * B + b;
          out[((b * C + c) * H + h) * W + w] = (flip ? NUM - 1 - k : k) / NUM;
        }
  return out;
}
const dummySampleDeter = () => deterministic(false);
const dummyNoiseDeter = () => deterministic(true);

/** sample * t / (t + 1), evaluated in float32 as torch does (t cast to the sample dtype). */
function dummyModel(sample: Float32Array, t: number): Float32Array {
  const tf = Math.fround(t);
  const tp1 = Math.fround(tf + 1);
  return sample.map((x) => Math.fround(x * tf) / tp1);
}

const scale = (x: Float32Array, s: number) => x.map((v) => v * s);
const absSum = (x: Float32Array) => x.reduce((acc, v) => acc + Math.abs(v), 0);
const absMean = (x: Float32Array) => absSum(x) / x.length;

/** diffusers' euler full_loop: note the model sees, and step() receives, the scaled input. */
function eulerLoop(
  s: Scheduler,
  opts: { noise?: NoiseSource; steps?: number; tStart?: number; addNoise?: (x: Float32Array, t: number) => Float32Array } = {},
): Float32Array {
  s.setTimesteps(opts.steps ?? 10);
  let sample: Float32Array = scale(dummySampleDeter(), s.initNoiseSigma);
  const timesteps = Array.from(s.timesteps).slice(opts.tStart ?? 0);
  if (opts.addNoise) sample = opts.addNoise(sample, timesteps[0]!);
  for (const t of timesteps) {
    sample = s.scaleModelInput(sample, t);
    const out = dummyModel(sample, t);
    sample = s.step(out, t, sample, opts.noise);
  }
  return sample;
}

/** diffusers' dpm full_loop: no input scaling, unit init noise sigma. */
function dpmLoop(s: DpmSolverMultistepScheduler, steps = 10): Float32Array {
  s.setTimesteps(steps);
  let sample = dummySampleDeter();
  for (const t of s.timesteps) sample = s.step(dummyModel(sample, t), t, sample);
  return sample;
}

/** VP coefficients of a k-diffusion sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, lambda = -log sigma. */
function vpOf(sigma: number): { alpha: number; sigma: number; lambda: number } {
  const alpha = 1 / Math.sqrt(sigma * sigma + 1);
  return { alpha, sigma: sigma * alpha, lambda: -Math.log(sigma) };
}

/** A model given as its data prediction x0(lambda), element by element (it ignores the sample). */
interface X0Model {
  x0(lambda: number, k: number): number;
  /** An antiderivative of e^lambda * x0(lambda), for the exact solution of the diffusion ODE. */
  integral(lambda: number, k: number): number;
}

const constantX0 = (target: Float32Array): X0Model => ({ x0: (_l, k) => target[k]!, integral: (l, k) => Math.exp(l) * target[k]! });

/** x0(lambda) = a + b * lambda, with a and b from the deterministic fixtures. */
function linearX0(): X0Model {
  const a = dummyNoiseDeter();
  const b = scale(dummySampleDeter(), 0.3);
  return { x0: (l, k) => a[k]! + b[k]! * l, integral: (l, k) => Math.exp(l) * (a[k]! + b[k]! * (l - 1)) };
}

/** The epsilon a model with data prediction x0 answers at sigma: (x - alpha * x0) / sigma_t. */
function epsilonFor(model: X0Model, x: Float32Array, sigma: number): Float32Array {
  const v = vpOf(sigma);
  return x.map((xk, k) => (xk - v.alpha * model.x0(v.lambda, k)) / v.sigma);
}

/** A DPM-Solver++ loop over a model given by x0(lambda); step i is at the scheduler's sigma i. */
function dpmLoopWith(s: DpmSolverMultistepScheduler, steps: number, start: Float32Array, model: X0Model): Float32Array {
  s.setTimesteps(steps);
  const sig = s.sigmas;
  let x = start;
  Array.from(s.timesteps).forEach((t, i) => (x = s.step(epsilonFor(model, x, sig[i]!), t, x)));
  return x;
}

/**
 * Each step's error against the exact solution of the diffusion ODE from that step's own input:
 * x_t = (sigma_t / sigma_s) x_s + sigma_t * integral of e^lambda x0(lambda) from lambda_s to lambda_t.
 * Relative to max(1, |exact|), largest over the elements.
 */
function localErrors(config: SchedulerConfig, steps: number, model: X0Model): number[] {
  const s = new DpmSolverMultistepScheduler(config);
  s.setTimesteps(steps);
  const sig = s.sigmas;
  let x = dummySampleDeter();
  return Array.from(s.timesteps, (t, i) => {
    const from = vpOf(sig[i]!);
    const to = vpOf(sig[i + 1]!);
    const out = s.step(epsilonFor(model, x, sig[i]!), t, x);
    const exact = Array.from(x, (xk, k) => (to.sigma / from.sigma) * xk + to.sigma * (model.integral(to.lambda, k) - model.integral(from.lambda, k)));
    x = out;
    return maxRelErr(out, exact);
  });
}

/** Largest |a - b| / max(1, |b|). */
function maxRelErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!) / Math.max(1, Math.abs(b[i]!)));
  return m;
}

function expectSumMean(x: Float32Array, sum: number | null, mean: number, sumTol = 1e-2, meanTol = 1e-3): void {
  if (sum !== null) expect(Math.abs(absSum(x) - sum)).toBeLessThan(sumTol);
  expect(Math.abs(absMean(x) - mean)).toBeLessThan(meanTol);
}

function expectClose(actual: ArrayLike<number>, expected: number[], relTol: number): void {
  expect(actual.length).toBe(expected.length);
  expected.forEach((e, i) => {
    const a = actual[i]!;
    expect(Math.abs(a - e), `index ${i}: ${a} vs ${e}`).toBeLessThanOrEqual(relTol * Math.max(1, Math.abs(e)));
  });
}

/** About one float32 ulp, relative. */
const SIGMA_TOL = 2e-7;

/** Stable Diffusion 1.5's scheduler_config.json (the same file the test models ship). */
const SD15: SchedulerConfig = SD15_SCHEDULER_CONFIG;

// ---- Euler ----------------------------------------------------------------------------------

const EULER_TEST: SchedulerConfig = { num_train_timesteps: 1100, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' };

describe('EulerDiscreteScheduler (diffusers test_scheduler_euler.py)', () => {
  it('full loop, no noise: sum 10.0807, mean 0.0131', () => {
    expectSumMean(eulerLoop(new EulerDiscreteScheduler(EULER_TEST), { noise: new TorchGenerator(0) }), 10.0807, 0.0131);
  });

  it('full loop with v_prediction: sum 0.0002, mean 2.2676e-06', () => {
    const s = new EulerDiscreteScheduler({ ...EULER_TEST, prediction_type: 'v_prediction' });
    expectSumMean(eulerLoop(s), 0.0002, 2.2676e-6);
  });

  it('full loop with Karras sigmas: sum 124.52299, mean 0.16214', () => {
    const s = new EulerDiscreteScheduler({ ...EULER_TEST, use_karras_sigmas: true });
    expectSumMean(eulerLoop(s), 124.52299499511719, 0.16213932633399963);
  });

  it('full loop from add_noise at step 8: sum 57062.9297, mean 74.3007', () => {
    const s = new EulerDiscreteScheduler(EULER_TEST);
    const noise = dummyNoiseDeter();
    const out = eulerLoop(s, { tStart: 8, addNoise: (x, t) => s.addNoise(x, noise, t) });
    expectSumMean(out, 57062.9297, 74.3007);
  });

  it('needs no noise source and does not consume one', () => {
    const s = new EulerDiscreteScheduler(EULER_TEST);
    expectSumMean(eulerLoop(s), 10.0807, 0.0131);
  });

  it('SD 1.5 config, 50 steps: fractional linspace timesteps and sigma_max 14.6146', () => {
    const s = new EulerDiscreteScheduler(SD15);
    s.setTimesteps(50);
    const ts = s.timesteps;
    expect(ts.length).toBe(50);
    // float32 values of linspace(0, 999, 50) reversed, exactly as diffusers stores them.
    expect(Array.from(ts.subarray(0, 4))).toEqual([999.0, 978.6122436523438, 958.2244873046875, 937.83673095703125]);
    expect(Array.from(ts.subarray(47))).toEqual([40.775508880615234, 20.387754440307617, 0.0]);
    const sig = s.sigmas;
    expect(sig.length).toBe(51);
    expectClose(sig.subarray(0, 3), [14.614648818969727, 12.936779975891113, 11.49165153503418], SIGMA_TOL);
    expectClose(sig.subarray(48), [0.13933750987052917, 0.029167532920837402, 0], SIGMA_TOL);
    expect(s.initNoiseSigma).toBeCloseTo(14.6146, 4);
  });

  it('SD 1.5 config with leading spacing: offset timesteps and init sigma sqrt(sigma_max^2 + 1)', () => {
    const s = new EulerDiscreteScheduler({ ...SD15, timestep_spacing: 'leading' });
    s.setTimesteps(30);
    const ts = s.timesteps;
    expect(Array.from(ts.subarray(0, 3))).toEqual([958, 925, 892]);
    expect(Array.from(ts.subarray(28))).toEqual([34, 1]);
    expectClose([s.sigmas[0]!], [11.476852], 1e-6);
    expectClose([s.initNoiseSigma], [11.520336], 1e-6);
  });

  it('trailing spacing: numpy arange/round semantics (7 steps)', () => {
    const s = new EulerDiscreteScheduler({ ...SD15, timestep_spacing: 'trailing' });
    s.setTimesteps(7);
    expect(Array.from(s.timesteps)).toEqual([999, 856, 713, 570, 428, 285, 142]);
    expect(s.initNoiseSigma).toBe(s.sigmas[0]);
  });

  it('SD 1.5 config with Karras sigmas, 20 steps: fractional timesteps from sigma_to_t', () => {
    const s = new EulerDiscreteScheduler({ ...SD15, use_karras_sigmas: true });
    s.setTimesteps(20);
    // numpy's float32 log and JavaScript's Math.log can differ in the last bit, which moves
    // these fractional timesteps by up to ~4e-5.
    const expected = [
      999.0, 961.7327880859375, 921.04205322265625, 876.313720703125, 826.79058837890625, 771.5519409179688, 709.5297241210938, 639.61474609375,
      560.975341796875, 473.7489013671875, 380.1317443847656, 285.3175354003906, 197.0806121826172, 123.39511108398438, 69.25687408447266, 34.69736099243164,
      15.481610298156738, 5.991831302642822, 1.7829495668411255, 0.0,
    ];
    const ts = s.timesteps;
    expect(ts.length).toBe(20);
    expected.forEach((e, i) => expect(Math.abs(ts[i]! - e), `timestep ${i}`).toBeLessThan(1e-4));
    const sig = s.sigmas;
    expectClose(sig.subarray(0, 3), [14.614648818969727, 11.725374221801758, 9.34021282196045], SIGMA_TOL);
    expectClose(sig.subarray(18), [0.04848191514611244, 0.029167532920837402, 0], SIGMA_TOL);
  });

  it('final_sigmas_type sigma_min ends on the smallest training sigma', () => {
    const s = new EulerDiscreteScheduler({ ...SD15, final_sigmas_type: 'sigma_min' });
    s.setTimesteps(10);
    expectClose([s.sigmas[10]!], [0.029167532920837402], SIGMA_TOL);
  });

  it('scaleModelInput divides by sqrt(sigma^2 + 1) and returns a new array', () => {
    const s = new EulerDiscreteScheduler(SD15);
    s.setTimesteps(10);
    const x = dummySampleDeter();
    const t = s.timesteps[0]!;
    const y = s.scaleModelInput(x, t);
    expect(y).not.toBe(x);
    const sigma = s.sigmas[0]!;
    expect(y[100]).toBeCloseTo(x[100]! / Math.sqrt(sigma * sigma + 1), 7);
  });
});

// ---- Euler ancestral ------------------------------------------------------------------------

describe('EulerAncestralScheduler (diffusers test_scheduler_euler_ancestral.py)', () => {
  it('full loop with torch.manual_seed(0): sum 152.3192, mean 0.1983', () => {
    const s = new EulerAncestralScheduler(EULER_TEST);
    expectSumMean(eulerLoop(s, { noise: new TorchGenerator(0) }), 152.3192, 0.1983);
  });

  it('full loop with v_prediction: sum 108.4439, mean 0.1412', () => {
    const s = new EulerAncestralScheduler({ ...EULER_TEST, prediction_type: 'v_prediction' });
    expectSumMean(eulerLoop(s, { noise: new TorchGenerator(0) }), 108.4439, 0.1412);
  });

  it('full loop from add_noise at step 8: sum 56163.0508, mean 73.1290', () => {
    const s = new EulerAncestralScheduler(EULER_TEST);
    const noise = dummyNoiseDeter();
    const out = eulerLoop(s, { noise: new TorchGenerator(0), tStart: 8, addNoise: (x, t) => s.addNoise(x, noise, t) });
    expectSumMean(out, 56163.0508, 73.129);
  });

  it('throws a clear error without a noise source', () => {
    const s = new EulerAncestralScheduler(EULER_TEST);
    s.setTimesteps(10);
    const t = s.timesteps[0]!;
    const x = dummySampleDeter();
    expect(() => s.step(x, t, x)).toThrow(/NoiseSource/);
  });

  it('shares the Euler schedule for SD 1.5', () => {
    const a = new EulerAncestralScheduler(SD15);
    const e = new EulerDiscreteScheduler(SD15);
    a.setTimesteps(50);
    e.setTimesteps(50);
    expect(Array.from(a.timesteps)).toEqual(Array.from(e.timesteps));
    expect(Array.from(a.sigmas)).toEqual(Array.from(e.sigmas));
    expect(a.initNoiseSigma).toBe(e.initNoiseSigma);
  });

  it('rejects prediction_type "sample", which diffusers does not implement here', () => {
    expect(() => new EulerAncestralScheduler({ prediction_type: 'sample' })).toThrow(/prediction_type/);
  });
});

// ---- DPM-Solver++ multistep -----------------------------------------------------------------

const DPM_TEST: SchedulerConfig = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  solver_order: 2,
  prediction_type: 'epsilon',
  thresholding: false,
  sample_max_value: 1.0,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: false,
  euler_at_final: false,
  lambda_min_clipped: -Infinity,
  variance_type: null,
  final_sigmas_type: 'sigma_min',
};

describe('DpmSolverMultistepScheduler (diffusers test_scheduler_dpm_multi.py)', () => {
  it('full loop, no noise: mean 0.3301', () => {
    expectSumMean(dpmLoop(new DpmSolverMultistepScheduler(DPM_TEST)), null, 0.3301);
  });

  it('full loop with v_prediction: mean 0.2251', () => {
    expectSumMean(dpmLoop(new DpmSolverMultistepScheduler({ ...DPM_TEST, prediction_type: 'v_prediction' })), null, 0.2251);
  });

  it('full loop with Karras sigmas and v_prediction: mean 0.2096', () => {
    const s = new DpmSolverMultistepScheduler({ ...DPM_TEST, prediction_type: 'v_prediction', use_karras_sigmas: true });
    expectSumMean(dpmLoop(s), null, 0.2096);
  });

  it('full loop with Lu lambdas and v_prediction: mean 0.1554', () => {
    const s = new DpmSolverMultistepScheduler({ ...DPM_TEST, prediction_type: 'v_prediction', use_lu_lambdas: true });
    expectSumMean(dpmLoop(s), null, 0.1554);
  });

  it('full loop from add_noise at step 5: sum 318.4111, mean 0.4146', () => {
    const s = new DpmSolverMultistepScheduler(DPM_TEST);
    s.setTimesteps(10);
    const timesteps = Array.from(s.timesteps).slice(5);
    let sample = s.addNoise(dummySampleDeter(), dummyNoiseDeter(), timesteps[0]!);
    for (const t of timesteps) sample = s.step(dummyModel(sample, t), t, sample);
    expectSumMean(sample, 318.4111, 0.4146);
  });

  it('lands on the exact ODE solution of a model that always predicts the same x0, from 1 to 999 steps', () => {
    // With x0 constant, every x0 difference is zero and each step is the exact exponential
    // integrator: x_i = alpha_i * T + sigma_i * eps for the eps of the starting sample. So the
    // end is T when the last sigma is 0 (SD 1.5's final_sigmas_type "zero") and
    // alpha_min * T + sigma_min * eps with diffusers' test config ("sigma_min").
    const target = dummyNoiseDeter();
    for (const config of [SD15, DPM_TEST])
      for (const n of [1, 2, 3, 5, 10, 50, 100, 999]) {
        const s = new DpmSolverMultistepScheduler(config);
        const start = dummySampleDeter();
        const out = dpmLoopWith(s, n, start, constantX0(target));
        expect(s.timesteps.length).toBe(n);
        const first = vpOf(s.sigmas[0]!);
        const last = vpOf(s.sigmas[n]!);
        const expected = Array.from(start, (x, k) => last.alpha * target[k]! + last.sigma * ((x - first.alpha * target[k]!) / first.sigma));
        // Float32 rounding only: recovering x0 = (x - sigma_t * eps) / alpha from a float32 eps
        // divides its rounding (2^-24 relative) by alpha, 0.0064 at the test config's top sigma.
        const tolerance = 2 ** -23 / first.alpha;
        expect(maxRelErr(out, expected), `final sigma ${String(config.final_sigmas_type ?? 'zero')}, n=${n}`).toBeLessThan(tolerance);
      }
  });

  it('keeps the duplicated timestep diffusers produces for 1000 steps (test_duplicated_timesteps)', () => {
    const s = new DpmSolverMultistepScheduler(DPM_TEST);
    s.setTimesteps(1000);
    const ts = Array.from(s.timesteps);
    expect(ts.length).toBe(1000);
    // linspace(0, 999, 1001) rounds 499.5 and 500.499 both to 500.
    expect(ts.filter((t) => t === 500).length).toBe(2);
    expect(new Set(ts).size).toBe(999);
  });

  it('first order is DDIM (Lu et al. 2022): the same samples as DdimScheduler on the same timesteps', () => {
    // DPM-Solver++(1) is DDIM with eta 0. Trailing spacing gives both the same timesteps, and a
    // final sigma of 0 is DDIM's set_alpha_to_one. DDIM itself is checked against diffusers'
    // numbers in schedulers-ddpm-family.test.ts.
    for (const n of [10, 25])
      for (const solver_type of ['midpoint', 'heun'] as const) {
        const ddim = new DdimScheduler({ ...DPM_TEST, clip_sample: false, set_alpha_to_one: true, timestep_spacing: 'trailing' });
        ddim.setTimesteps(n);
        let x = dummySampleDeter();
        for (const t of ddim.timesteps) x = ddim.step(dummyModel(x, t), t, x);
        const dpm = new DpmSolverMultistepScheduler({ ...DPM_TEST, solver_order: 1, solver_type, final_sigmas_type: 'zero', timestep_spacing: 'trailing' });
        dpm.setTimesteps(n);
        expect(Array.from(dpm.timesteps)).toEqual(Array.from(ddim.timesteps));
        let y = dummySampleDeter();
        for (const t of dpm.timesteps) y = dpm.step(dummyModel(y, t), t, y);
        expect(maxRelErr(y, x), `n=${n}, ${solver_type}`).toBeLessThan(1e-6);
      }
  });

  it('second order (heun) and third order are exact, after their warm-up steps, when x0 is linear in lambda', () => {
    // The multistep differences recover the slope of x0(lambda) exactly, and heun's coefficient
    // is the exact integral of the linear term; the first step (and for third order the second)
    // runs at a lower order and is not exact.
    const x0 = linearX0();
    for (const [solver_order, solver_type] of [
      [2, 'heun'],
      [3, 'heun'],
      [3, 'midpoint'],
    ] as const) {
      const errs = localErrors({ ...DPM_TEST, solver_order, solver_type }, 25, x0);
      const exactFrom = solver_order - 1;
      expect(Math.max(...errs.slice(exactFrom)), `order ${solver_order} ${solver_type}: ${errs.join(', ')}`).toBeLessThan(2e-6);
      // The warm-up step is first order: it misses the slope, which proves the check can fail.
      expect(errs[0]).toBeGreaterThan(1e-4);
    }
  });

  it('second order midpoint only approximates the linear term (a control for the exactness check above)', () => {
    const errs = localErrors({ ...DPM_TEST, solver_order: 2, solver_type: 'midpoint' }, 25, linearX0());
    for (const [i, e] of errs.slice(1).entries()) expect(e, `step ${i + 1}`).toBeGreaterThan(1e-5);
  });

  it('SD 1.5 config, 20 steps: linspace timesteps rounded half to even (499.5 -> 500)', () => {
    const s = new DpmSolverMultistepScheduler(SD15);
    s.setTimesteps(20);
    expect(Array.from(s.timesteps)).toEqual([999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]);
    expectClose(s.sigmas.subarray(0, 3), [14.614648818969727, 10.904241561889648, 8.302806854248047], SIGMA_TOL);
    expect(s.sigmas[20]).toBe(0);
    expect(s.initNoiseSigma).toBe(1);
  });

  it('SD 1.5 config with Karras sigmas, 25 steps: rounded timesteps for the UNet, exact sigmas for the solver', () => {
    const s = new DpmSolverMultistepScheduler({ ...SD15, use_karras_sigmas: true });
    s.setTimesteps(25);
    expect(Array.from(s.timesteps)).toEqual([999, 970, 938, 905, 868, 829, 786, 739, 687, 630, 568, 500, 427, 352, 278, 207, 146, 96, 59, 34, 18, 9, 4, 1, 0]);
    const sig = s.sigmas;
    expect(sig.length).toBe(26);
    expectClose(sig.subarray(0, 4), [14.614648818969727, 12.283042907714844, 10.277833938598633, 8.560019493103027], SIGMA_TOL);
    expectClose(sig.subarray(22), [0.06416226923465729, 0.04374285787343979, 0.029167532920837402, 0], SIGMA_TOL);
  });

  it("defaults are diffusers' (no Karras sigmas unless the config asks)", () => {
    const plain = new DpmSolverMultistepScheduler(SD15);
    expect(plain.options.use_karras_sigmas).toBe(false);
    expect(plain.options.lower_order_final).toBe(true);
    expect(plain.options.final_sigmas_type).toBe('zero');
    expect(plain.options.solver_order).toBe(2);
  });

  it('scaleModelInput is the identity (as a copy)', () => {
    const s = new DpmSolverMultistepScheduler(SD15);
    s.setTimesteps(10);
    const x = dummySampleDeter();
    const y = s.scaleModelInput(x, s.timesteps[0]!);
    expect(y).not.toBe(x);
    expect(Array.from(y)).toEqual(Array.from(x));
  });
});

// ---- behaviour shared by all three ----------------------------------------------------------

const makers: [string, (c: SchedulerConfig) => Scheduler][] = [
  ['euler', (c) => new EulerDiscreteScheduler(c)],
  ['euler_ancestral', (c) => new EulerAncestralScheduler(c)],
  ['dpmpp_2m', (c) => new DpmSolverMultistepScheduler(c)],
];

describe.each(makers)('%s contract', (name, make) => {
  it('has its name and one model call per step', () => {
    const s = make(SD15);
    expect(s.name).toBe(name);
    expect(s.order).toBe(1);
  });

  it('step returns a new array and leaves its inputs untouched', () => {
    const s = make(SD15);
    s.setTimesteps(10);
    const t = s.timesteps[0]!;
    const x = dummySampleDeter();
    const eps = dummyNoiseDeter();
    const xCopy = x.slice();
    const epsCopy = eps.slice();
    const scaled = s.scaleModelInput(x, t);
    const out = s.step(eps, t, scaled, new TorchGenerator(1));
    expect(out).toBeInstanceOf(Float32Array);
    expect(out).not.toBe(x);
    expect(out).not.toBe(scaled);
    expect(Array.from(x)).toEqual(Array.from(xCopy));
    expect(Array.from(eps)).toEqual(Array.from(epsCopy));
  });

  it('tracks its own step index and is reset by setTimesteps', () => {
    const s = make(SD15);
    const run = () => {
      s.setTimesteps(5);
      let x: Float32Array = scale(dummySampleDeter(), s.initNoiseSigma);
      for (const t of s.timesteps) {
        x = s.scaleModelInput(x, t);
        x = s.step(dummyModel(x, t), t, x, new TorchGenerator(3));
      }
      return x;
    };
    const first = run();
    expect(Array.from(run())).toEqual(Array.from(first));
  });

  it('rejects a timestep that is not in the schedule, and stepping past the end', () => {
    const s = make(SD15);
    s.setTimesteps(3);
    const x = dummySampleDeter();
    expect(() => s.step(x, 12345.5, x, new TorchGenerator(0))).toThrow(/not in the schedule/);
    const fresh = make(SD15);
    fresh.setTimesteps(3);
    let y = x;
    for (const t of fresh.timesteps) y = fresh.step(dummyModel(y, t), t, fresh.scaleModelInput(y, t), new TorchGenerator(0));
    expect(() => fresh.step(y, fresh.timesteps[2]!, y, new TorchGenerator(0))).toThrow(/setTimesteps/);
  });

  it('rejects mismatched lengths and invalid configs with the offending key', () => {
    const s = make(SD15);
    s.setTimesteps(3);
    const t = s.timesteps[0]!;
    expect(() => s.step(new Float32Array(4), t, new Float32Array(5), new TorchGenerator(0))).toThrow(/must match/);
    expect(() => s.setTimesteps(0)).toThrow(/numInferenceSteps/);
    expect(() => make({ prediction_type: 'x0' as never })).toThrow(/prediction_type/);
    expect(() => make({ timestep_spacing: 'even' as never })).toThrow(/timestep_spacing/);
    expect(() => make({ num_train_timesteps: 10.5 })).toThrow(/num_train_timesteps/);
    expect(() => make({ beta_schedule: 'cubic' as never })).toThrow(/beta_schedule/);
    expect(() => make({ rescale_betas_zero_snr: true })).toThrow(/rescale_betas_zero_snr/);
  });

  it('ignores keys it does not know (SD 1.5 PNDM config loads)', () => {
    expect(() => make({ ...SD15, some_future_key: 3 })).not.toThrow();
  });
});
