import { noiseSchedule } from './betas.js';
import {
  addNoiseAt,
  alphaAt,
  checkInferenceSteps,
  checkSameLength,
  expectInteger,
  expectPositive,
  validateDdpmFamily,
  withDefaults,
  type DdpmFamilyConfig,
} from './ddim.js';
import { npLinspace } from './math.js';
import type { NoiseSource, Scheduler, SchedulerConfig } from './types.js';

/**
 * Latent Consistency Model multistep sampling (Luo et al. 2023), matching diffusers'
 * LCMScheduler. Each step maps x_t straight to a clean estimate via the consistency
 * function's boundary-condition parametrisation (c_skip x_t + c_out x0_pred), then, unless it
 * is the last step, re-noises that estimate to the next timestep with fresh N(0, 1) noise.
 * Timesteps are a subset of the `original_inference_steps`-point schedule the model was
 * distilled on.
 *
 * Stateful: the step index is taken from the first timestep step() sees, then advances by one
 * per call, as in diffusers.
 */

export interface LcmConfig extends DdpmFamilyConfig {
  original_inference_steps: number;
  clip_sample: boolean;
  clip_sample_range: number;
  timestep_scaling: number;
}

/** LCMScheduler.__init__ defaults. */
export const LCM_DEFAULTS: Readonly<LcmConfig> = {
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  trained_betas: null,
  original_inference_steps: 50,
  clip_sample: false,
  clip_sample_range: 1.0,
  set_alpha_to_one: true,
  prediction_type: 'epsilon',
  timestep_scaling: 10.0,
};

/** sigma_data of the consistency-model boundary condition (fixed at 0.5 in diffusers). */
const SIGMA_DATA = 0.5;

export class LcmScheduler implements Scheduler {
  readonly name = 'lcm' as const;
  readonly order = 1;
  readonly initNoiseSigma = 1;
  readonly config: Readonly<LcmConfig>;
  timesteps: Float64Array = new Float64Array(0);

  private readonly alphasCumprod: Float64Array;
  private readonly finalAlphaCumprod: number;
  private stepIndex: number | null = null;

  constructor(config: SchedulerConfig = {}) {
    const c = withDefaults(LCM_DEFAULTS, config);
    validateDdpmFamily('lcm', c, config, ['epsilon', 'v_prediction', 'sample']);
    expectInteger('lcm', 'original_inference_steps', c.original_inference_steps, 1);
    if (c.original_inference_steps > c.num_train_timesteps) {
      throw new Error(`lcm: original_inference_steps ${c.original_inference_steps} exceeds num_train_timesteps ${c.num_train_timesteps}`);
    }
    if (typeof c.clip_sample !== 'boolean') throw new Error(`lcm: clip_sample must be true or false, got ${String(c.clip_sample)}`);
    expectPositive('lcm', 'clip_sample_range', c.clip_sample_range);
    expectPositive('lcm', 'timestep_scaling', c.timestep_scaling);
    this.config = Object.freeze(c);
    this.alphasCumprod = noiseSchedule(c).alphasCumprod;
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : this.alphasCumprod[0]!;
  }

  setTimesteps(numInferenceSteps: number): void {
    const c = this.config;
    const original = c.original_inference_steps;
    checkInferenceSteps('lcm', numInferenceSteps, c.num_train_timesteps);
    if (numInferenceSteps > original) {
      throw new Error(`lcm: numInferenceSteps ${numInferenceSteps} exceeds original_inference_steps ${original}: LCM timesteps are a subset of that schedule`);
    }
    // The distillation schedule k - 1, 2k - 1, ..., original * k - 1 with k = T // original,
    // walked from the top; inference picks evenly spaced indices into it.
    const k = Math.floor(c.num_train_timesteps / original);
    const picks = npLinspace(0, original, numInferenceSteps, false);
    const timesteps = new Float64Array(numInferenceSteps);
    for (let i = 0; i < numInferenceSteps; i++) timesteps[i] = (original - Math.floor(picks[i]!)) * k - 1;
    this.timesteps = timesteps;
    this.stepIndex = null;
  }

  scaleModelInput(sample: Float32Array, _timestep: number): Float32Array {
    return sample.slice();
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, noise?: NoiseSource): Float32Array {
    const n = this.timesteps.length;
    if (n === 0) throw new Error('lcm: call setTimesteps() before step()');
    checkSameLength('lcm', modelOutput, sample);
    const index = this.stepIndex ?? this.indexForTimestep(timestep);
    if (index >= n) throw new Error(`lcm: step() called ${index + 1} times for a ${n}-step schedule; call setTimesteps() again`);
    const isLast = index >= n - 1;
    const prevT = isLast ? timestep : this.timesteps[index + 1]!;
    const c = this.config;
    const aT = alphaAt('lcm', this.alphasCumprod, timestep);
    const aPrev = prevT >= 0 ? alphaAt('lcm', this.alphasCumprod, prevT) : this.finalAlphaCumprod;
    const sqrtA = Math.sqrt(aT);
    const sqrtB = Math.sqrt(1 - aT);
    // Boundary condition: c_skip -> 1 and c_out -> 0 as t -> 0, so the estimate is x_0 itself there.
    const scaled = timestep * c.timestep_scaling;
    const cSkip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2);
    const cOut = scaled / Math.sqrt(scaled ** 2 + SIGMA_DATA ** 2);
    const clip = c.clip_sample ? c.clip_sample_range : Infinity;

    let z: Float32Array | null = null;
    if (!isLast) {
      if (!noise) {
        throw new Error(`lcm: step ${index + 1} of ${n} re-noises the estimate and needs a NoiseSource, got none`);
      }
      z = noise.randn(sample.length);
      if (z.length !== sample.length) throw new Error(`lcm: noise source returned ${z.length} values, expected ${sample.length}`);
    }
    const sqrtAPrev = Math.sqrt(aPrev);
    const sqrtBPrev = Math.sqrt(1 - aPrev);
    const out = new Float32Array(sample.length);
    for (let i = 0; i < out.length; i++) {
      const m = modelOutput[i]!;
      const s = sample[i]!;
      let x0 = c.prediction_type === 'epsilon' ? (s - sqrtB * m) / sqrtA : c.prediction_type === 'v_prediction' ? sqrtA * s - sqrtB * m : m;
      x0 = Math.min(clip, Math.max(-clip, x0));
      // Rounded to float32 before re-noising, as torch holds `denoised` as a float32 tensor.
      const denoised = Math.fround(cOut * x0 + cSkip * s);
      out[i] = z ? sqrtAPrev * denoised + sqrtBPrev * z[i]! : denoised;
    }
    this.stepIndex = index + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    return addNoiseAt('lcm', this.alphasCumprod, original, noise, timestep);
  }

  /** diffusers' index_for_timestep: the second match if the timestep repeats, else the first. */
  private indexForTimestep(timestep: number): number {
    const matches: number[] = [];
    this.timesteps.forEach((t, i) => {
      if (t === timestep) matches.push(i);
    });
    const index = matches.length > 1 ? matches[1] : matches[0];
    if (index === undefined) throw new Error(`lcm: timestep ${timestep} is not in the schedule [${Array.from(this.timesteps).join(', ')}]`);
    return index;
  }
}
