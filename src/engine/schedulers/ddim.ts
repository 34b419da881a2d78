import { noiseSchedule } from './betas.js';
import { npArange, npLinspace, roundHalfEven } from './math.js';
import type { NoiseSource, Scheduler, SchedulerConfig } from './types.js';

/**
 * DDIM (Song et al. 2020) with eta = 0, i.e. the deterministic sampler, matching diffusers'
 * DDIMScheduler. This module also holds the pieces PNDM and LCM share with it: the
 * discrete-timestep config handling, the leading/trailing/linspace timestep spacings and the
 * forward-noising formula, since all three index the same alphas_cumprod table by integer
 * timestep.
 */

export type Spacing = 'leading' | 'trailing' | 'linspace';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';

/** The config keys every DDPM-family scheduler reads, after defaults are applied. */
export interface DdpmFamilyConfig {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
  trained_betas: number[] | null;
  set_alpha_to_one: boolean;
  prediction_type: PredictionType;
}

export interface DdimConfig extends DdpmFamilyConfig {
  clip_sample: boolean;
  clip_sample_range: number;
  steps_offset: number;
  timestep_spacing: Spacing;
}

/** DDIMScheduler.__init__ defaults. */
export const DDIM_DEFAULTS: Readonly<DdimConfig> = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  clip_sample: true,
  clip_sample_range: 1.0,
  set_alpha_to_one: true,
  steps_offset: 0,
  prediction_type: 'epsilon',
  timestep_spacing: 'leading',
};

/**
 * `from_config` semantics: keys of `defaults` that `config` sets win; keys `config` lacks
 * (or sets to null, as serialized configs do for "unset") keep the default; keys the
 * algorithm does not know are ignored.
 */
export function withDefaults<T extends object>(defaults: Readonly<T>, config: SchedulerConfig): T {
  const out = { ...defaults } as T;
  for (const key of Object.keys(defaults) as (keyof T & string)[]) {
    const value = config[key];
    if (value !== undefined && value !== null) out[key] = value as T[keyof T & string];
  }
  return out;
}

function expectOneOf<V extends string>(scheduler: string, key: string, value: unknown, allowed: readonly V[]): void {
  if (!allowed.includes(value as V)) {
    throw new Error(`${scheduler}: ${key} "${String(value)}" is not one of ${allowed.join(', ')}`);
  }
}

function expectBoolean(scheduler: string, key: string, value: unknown): void {
  if (typeof value !== 'boolean') throw new Error(`${scheduler}: ${key} must be true or false, got ${String(value)}`);
}

export function expectInteger(scheduler: string, key: string, value: unknown, min: number): void {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min) {
    throw new Error(`${scheduler}: ${key} must be an integer >= ${min}, got ${String(value)}`);
  }
}

export function expectPositive(scheduler: string, key: string, value: unknown): void {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new Error(`${scheduler}: ${key} must be a positive number, got ${String(value)}`);
  }
}

/**
 * Validates the shared keys and rejects the diffusers options this port does not implement,
 * so a config that asks for them fails loudly instead of sampling differently.
 */
export function validateDdpmFamily(scheduler: string, c: DdpmFamilyConfig, raw: SchedulerConfig, predictions: readonly PredictionType[]): void {
  expectInteger(scheduler, 'num_train_timesteps', c.num_train_timesteps, 1);
  expectPositive(scheduler, 'beta_start', c.beta_start);
  expectPositive(scheduler, 'beta_end', c.beta_end);
  expectOneOf(scheduler, 'beta_schedule', c.beta_schedule, ['linear', 'scaled_linear', 'squaredcos_cap_v2'] as const);
  expectBoolean(scheduler, 'set_alpha_to_one', c.set_alpha_to_one);
  expectOneOf(scheduler, 'prediction_type', c.prediction_type, predictions);
  for (const unsupported of ['thresholding', 'rescale_betas_zero_snr'] as const) {
    if (raw[unsupported] === true) throw new Error(`${scheduler}: ${unsupported}=true is not supported`);
  }
}

export function validateSpacing(scheduler: string, spacing: unknown, stepsOffset: unknown): void {
  expectOneOf(scheduler, 'timestep_spacing', spacing, ['leading', 'trailing', 'linspace'] as const);
  expectInteger(scheduler, 'steps_offset', stepsOffset, 0);
}

export function checkInferenceSteps(scheduler: string, n: number, numTrainTimesteps: number): void {
  if (!Number.isInteger(n) || n < 1) throw new Error(`${scheduler}: numInferenceSteps must be an integer >= 1, got ${n}`);
  if (n > numTrainTimesteps) {
    throw new Error(`${scheduler}: numInferenceSteps ${n} exceeds num_train_timesteps ${numTrainTimesteps}`);
  }
}

/**
 * The integer timesteps of diffusers' DDIM/PNDM `set_timesteps`, descending. `leading`
 * (SD 1.x's default) steps down from the start by T // n and adds steps_offset; `trailing`
 * always includes T - 1; `linspace` spreads n points over [0, T - 1]. steps_offset applies
 * to `leading` only, as in diffusers.
 */
export function spacedTimesteps(spacing: Spacing, numTrainTimesteps: number, n: number, stepsOffset: number): Float64Array {
  const T = numTrainTimesteps;
  const out = new Float64Array(n);
  if (spacing === 'leading') {
    const ratio = Math.floor(T / n);
    for (let i = 0; i < n; i++) out[i] = (n - 1 - i) * ratio + stepsOffset;
  } else if (spacing === 'trailing') {
    // Float step: with T % n != 0 the rounding (half to even) decides each timestep. For some
    // n (e.g. T = 1000, n = 61) numpy's arange yields an extra element ~1e-13 that diffusers
    // turns into timestep -1; only the first n are kept, so that bogus step is dropped.
    const grid = npArange(T, 0, -T / n);
    for (let i = 0; i < n; i++) out[i] = roundHalfEven(grid[i]!) - 1;
  } else {
    const grid = npLinspace(0, T - 1, n);
    for (let i = 0; i < n; i++) out[i] = roundHalfEven(grid[n - 1 - i]!);
  }
  return out;
}

/** alphas_cumprod[t], refusing timesteps outside the training table rather than reading NaN. */
export function alphaAt(scheduler: string, alphasCumprod: Float64Array, t: number): number {
  const a = Number.isInteger(t) ? alphasCumprod[t] : undefined;
  if (a === undefined) {
    throw new Error(`${scheduler}: timestep ${t} is not an integer in [0, ${alphasCumprod.length - 1}]`);
  }
  return a;
}

export function checkSameLength(scheduler: string, modelOutput: ArrayLike<number>, sample: ArrayLike<number>): void {
  if (modelOutput.length !== sample.length) {
    throw new Error(`${scheduler}: model output has ${modelOutput.length} values but sample has ${sample.length}`);
  }
}

/**
 * Forward diffusion q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, the img2img starting
 * point (diffusers' `add_noise` for these schedulers).
 */
export function addNoiseAt(scheduler: string, alphasCumprod: Float64Array, original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
  checkSameLength(scheduler, noise, original);
  const a = alphaAt(scheduler, alphasCumprod, timestep);
  const sa = Math.sqrt(a);
  const sb = Math.sqrt(1 - a);
  const out = new Float32Array(original.length);
  for (let i = 0; i < out.length; i++) out[i] = sa * original[i]! + sb * noise[i]!;
  return out;
}

export class DdimScheduler implements Scheduler {
  readonly name = 'ddim' as const;
  readonly order = 1;
  readonly initNoiseSigma = 1;
  readonly config: Readonly<DdimConfig>;
  timesteps: Float64Array = new Float64Array(0);

  private readonly alphasCumprod: Float64Array;
  /** alpha_cumprod "before" t = 0, used by the last step: 1, or alphas_cumprod[0] (SD 1.x). */
  private readonly finalAlphaCumprod: number;
  private numInferenceSteps = 0;

  constructor(config: SchedulerConfig = {}) {
    const c = withDefaults(DDIM_DEFAULTS, config);
    validateDdpmFamily('ddim', c, config, ['epsilon', 'v_prediction', 'sample']);
    validateSpacing('ddim', c.timestep_spacing, c.steps_offset);
    expectBoolean('ddim', 'clip_sample', c.clip_sample);
    expectPositive('ddim', 'clip_sample_range', c.clip_sample_range);
    this.config = Object.freeze(c);
    this.alphasCumprod = noiseSchedule(c).alphasCumprod;
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : this.alphasCumprod[0]!;
  }

  setTimesteps(numInferenceSteps: number): void {
    checkInferenceSteps('ddim', numInferenceSteps, this.config.num_train_timesteps);
    this.numInferenceSteps = numInferenceSteps;
    this.timesteps = spacedTimesteps(this.config.timestep_spacing, this.config.num_train_timesteps, numInferenceSteps, this.config.steps_offset);
  }

  scaleModelInput(sample: Float32Array, _timestep: number): Float32Array {
    return sample.slice();
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, _noise?: NoiseSource): Float32Array {
    if (this.numInferenceSteps === 0) throw new Error('ddim: call setTimesteps() before step()');
    checkSameLength('ddim', modelOutput, sample);
    const c = this.config;
    // diffusers steps back by T // n whatever the spacing, so trailing/linspace can land off-grid.
    const prevT = timestep - Math.floor(c.num_train_timesteps / this.numInferenceSteps);
    const aT = alphaAt('ddim', this.alphasCumprod, timestep);
    const aPrev = prevT >= 0 ? alphaAt('ddim', this.alphasCumprod, prevT) : this.finalAlphaCumprod;
    const sqrtA = Math.sqrt(aT);
    const sqrtB = Math.sqrt(1 - aT);
    const sqrtAPrev = Math.sqrt(aPrev);
    // eta = 0: no fresh noise, the whole remaining variance points along the predicted epsilon.
    const dirCoeff = Math.sqrt(1 - aPrev);
    const clip = c.clip_sample ? c.clip_sample_range : Infinity;
    const out = new Float32Array(sample.length);
    for (let i = 0; i < out.length; i++) {
      const m = modelOutput[i]!;
      const s = sample[i]!;
      let x0: number;
      let eps: number;
      if (c.prediction_type === 'epsilon') {
        x0 = (s - sqrtB * m) / sqrtA;
        eps = m;
      } else if (c.prediction_type === 'v_prediction') {
        x0 = sqrtA * s - sqrtB * m;
        eps = sqrtA * m + sqrtB * s;
      } else {
        x0 = m;
        eps = (s - sqrtA * x0) / sqrtB;
      }
      // Only x0 is clipped; epsilon stays the unclipped one (use_clipped_model_output=False).
      x0 = Math.min(clip, Math.max(-clip, x0));
      out[i] = sqrtAPrev * x0 + dirCoeff * eps;
    }
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    return addNoiseAt('ddim', this.alphasCumprod, original, noise, timestep);
  }
}
