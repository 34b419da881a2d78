import { noiseSchedule } from './betas.js';
import {
  addNoiseAt,
  alphaAt,
  checkInferenceSteps,
  checkSameLength,
  spacedTimesteps,
  validateDdpmFamily,
  validateSpacing,
  withDefaults,
  type DdpmFamilyConfig,
  type Spacing,
} from './ddim.js';
import type { NoiseSource, Scheduler, SchedulerConfig } from './types.js';

/**
 * PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models") as diffusers'
 * PNDMScheduler implements it: an optional Runge-Kutta warm-up (PRK, 3 steps of 4 model
 * evaluations each) followed by a 4th-order linear multistep method (PLMS) over past
 * epsilons. Stable Diffusion 1.x sets skip_prk_steps, which replaces the warm-up with
 * crowsonkb's PLMS start: the second timestep is evaluated twice (Heun-like), which is why the
 * timestep list repeats an entry near its start (981, 961, 961, 941, ...).
 *
 * Stateful: step() must see the timesteps in order, once each, after setTimesteps().
 */

export interface PndmConfig extends DdpmFamilyConfig {
  skip_prk_steps: boolean;
  steps_offset: number;
  timestep_spacing: Spacing;
}

/** PNDMScheduler.__init__ defaults. */
export const PNDM_DEFAULTS: Readonly<PndmConfig> = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  skip_prk_steps: false,
  set_alpha_to_one: false,
  prediction_type: 'epsilon',
  timestep_spacing: 'leading',
  steps_offset: 0,
};

/** Order of the multistep method, hence also the number of RK warm-up timesteps. */
const PNDM_ORDER = 4;

export class PndmScheduler implements Scheduler {
  readonly name = 'pndm' as const;
  readonly order = 1;
  readonly initNoiseSigma = 1;
  readonly config: Readonly<PndmConfig>;
  timesteps: Float64Array = new Float64Array(0);
  /** The RK warm-up part of `timesteps` (empty with skip_prk_steps). */
  prkTimesteps: Float64Array = new Float64Array(0);
  /** The multistep part of `timesteps`. */
  plmsTimesteps: Float64Array = new Float64Array(0);

  private readonly alphasCumprod: Float64Array;
  private readonly finalAlphaCumprod: number;
  private numInferenceSteps = 0;
  // Running state, reset by setTimesteps().
  private counter = 0;
  /** Past epsilons, newest last; only the last four are ever read. */
  private ets: Float32Array[] = [];
  /** The sample the current RK step (or PLMS's doubled first step) started from. */
  private curSample: Float32Array | null = null;
  /** RK weighted sum of epsilons 1/6, 1/3, 1/3 accumulated over a 4-evaluation step. */
  private curModelOutput: Float64Array | null = null;

  constructor(config: SchedulerConfig = {}) {
    const c = withDefaults(PNDM_DEFAULTS, config);
    validateDdpmFamily('pndm', c, config, ['epsilon', 'v_prediction']);
    validateSpacing('pndm', c.timestep_spacing, c.steps_offset);
    if (typeof c.skip_prk_steps !== 'boolean') throw new Error(`pndm: skip_prk_steps must be true or false, got ${String(c.skip_prk_steps)}`);
    this.config = Object.freeze(c);
    this.alphasCumprod = noiseSchedule(c).alphasCumprod;
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : this.alphasCumprod[0]!;
  }

  setTimesteps(numInferenceSteps: number): void {
    const c = this.config;
    checkInferenceSteps('pndm', numInferenceSteps, c.num_train_timesteps);
    if (!c.skip_prk_steps && numInferenceSteps < PNDM_ORDER) {
      throw new Error(`pndm: numInferenceSteps must be >= ${PNDM_ORDER} when skip_prk_steps is false, got ${numInferenceSteps}`);
    }
    this.numInferenceSteps = numInferenceSteps;
    const n = numInferenceSteps;
    const desc = spacedTimesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
    if (c.skip_prk_steps) {
      this.prkTimesteps = new Float64Array(0);
      // Descending, with the second timestep doubled: [t0, t1, t1, t2, ..., t_{n-1}].
      const plms = n === 1 ? [desc[0]!] : [desc[0]!, desc[1]!, ...desc.subarray(1)];
      this.plmsTimesteps = Float64Array.from(plms);
    } else {
      // One RK step from each of the 3 highest timesteps down to the next one, evaluated at its
      // start, twice at the midpoint and at its end. diffusers places the midpoint at
      // next + (T // n) // 2, which for an odd stride is not halfway from the start.
      const half = Math.floor(Math.floor(c.num_train_timesteps / n) / 2);
      const prk: number[] = [];
      for (let k = 0; k < PNDM_ORDER - 1; k++) {
        const next = desc[k + 1]!;
        prk.push(desc[k]!, next + half, next + half, next);
      }
      this.prkTimesteps = Float64Array.from(prk);
      this.plmsTimesteps = desc.slice(PNDM_ORDER - 1);
    }
    const all = new Float64Array(this.prkTimesteps.length + this.plmsTimesteps.length);
    all.set(this.prkTimesteps);
    all.set(this.plmsTimesteps, this.prkTimesteps.length);
    this.timesteps = all;
    this.counter = 0;
    this.ets = [];
    this.curSample = null;
    this.curModelOutput = null;
  }

  scaleModelInput(sample: Float32Array, _timestep: number): Float32Array {
    return sample.slice();
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, _noise?: NoiseSource): Float32Array {
    if (this.numInferenceSteps === 0) throw new Error('pndm: call setTimesteps() before step()');
    checkSameLength('pndm', modelOutput, sample);
    return this.counter < this.prkTimesteps.length && !this.config.skip_prk_steps
      ? this.stepPrk(modelOutput, timestep, sample)
      : this.stepPlms(modelOutput, timestep, sample);
  }

  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    return addNoiseAt('pndm', this.alphasCumprod, original, noise, timestep);
  }

  private stepPrk(modelOutput: Float32Array, timestep: number, sample: Float32Array): Float32Array {
    const half = Math.floor(Math.floor(this.config.num_train_timesteps / this.numInferenceSteps) / 2);
    const phase = this.counter % 4;
    const prevT = timestep - (this.counter % 2 ? 0 : half);
    // Every evaluation of one RK step moves from the step's starting sample and timestep.
    const startT = this.prkTimesteps[this.counter - phase]!;
    let eps: ArrayLike<number> = modelOutput;
    if (phase === 0) {
      this.curModelOutput = new Float64Array(modelOutput.length);
      this.ets.push(modelOutput.slice());
      this.curSample = sample.slice();
    }
    const acc = this.curModelOutput ?? new Float64Array(modelOutput.length);
    if (phase === 3) {
      const combined = new Float64Array(modelOutput.length);
      for (let i = 0; i < combined.length; i++) combined[i] = acc[i]! + modelOutput[i]! / 6;
      eps = combined;
      this.curModelOutput = null;
    } else {
      const w = phase === 0 ? 1 / 6 : 1 / 3;
      for (let i = 0; i < acc.length; i++) acc[i]! += w * modelOutput[i]!;
      this.curModelOutput = acc;
    }
    const from = this.curSample ?? sample;
    this.counter++;
    return this.prevSample(from, startT, prevT, eps);
  }

  private stepPlms(modelOutput: Float32Array, timestep: number, sample: Float32Array): Float32Array {
    if (!this.config.skip_prk_steps && this.ets.length < PNDM_ORDER - 1) {
      throw new Error(`pndm: PLMS steps need ${PNDM_ORDER - 1} past model outputs from the PRK warm-up, have ${this.ets.length}`);
    }
    const stride = Math.floor(this.config.num_train_timesteps / this.numInferenceSteps);
    let t = timestep;
    let prevT = timestep - stride;
    let from: Float32Array = sample;
    if (this.counter !== 1) {
      this.ets = this.ets.slice(-(PNDM_ORDER - 1));
      this.ets.push(modelOutput.slice());
    } else {
      // The doubled timestep: redo the first step from its start with the averaged epsilon.
      prevT = timestep;
      t = timestep + stride;
    }
    const e = this.ets;
    const n = e.length;
    const len = modelOutput.length;
    const eps = new Float64Array(len);
    if (n === 1 && this.counter === 0) {
      eps.set(modelOutput);
      this.curSample = sample.slice();
    } else if (n === 1 && this.counter === 1) {
      const e1 = e[0]!;
      for (let i = 0; i < len; i++) eps[i] = (modelOutput[i]! + e1[i]!) / 2;
      from = this.curSample ?? sample;
      this.curSample = null;
    } else if (n === 2) {
      const [e2, e1] = [e[0]!, e[1]!];
      for (let i = 0; i < len; i++) eps[i] = (3 * e1[i]! - e2[i]!) / 2;
    } else if (n === 3) {
      const [e3, e2, e1] = [e[0]!, e[1]!, e[2]!];
      for (let i = 0; i < len; i++) eps[i] = (23 * e1[i]! - 16 * e2[i]! + 5 * e3[i]!) / 12;
    } else {
      const [e4, e3, e2, e1] = [e[n - 4]!, e[n - 3]!, e[n - 2]!, e[n - 1]!];
      for (let i = 0; i < len; i++) eps[i] = (55 * e1[i]! - 59 * e2[i]! + 37 * e3[i]! - 9 * e4[i]!) / 24;
    }
    this.counter++;
    return this.prevSample(from, t, prevT, eps);
  }

  /** PNDM paper eq. (9): x_{t-δ} from x_t and an epsilon estimate. */
  private prevSample(sample: Float32Array, t: number, prevT: number, modelOutput: ArrayLike<number>): Float32Array {
    const aT = alphaAt('pndm', this.alphasCumprod, t);
    const aPrev = prevT >= 0 ? alphaAt('pndm', this.alphasCumprod, prevT) : this.finalAlphaCumprod;
    const bT = 1 - aT;
    const bPrev = 1 - aPrev;
    const sqrtA = Math.sqrt(aT);
    const sqrtB = Math.sqrt(bT);
    const v = this.config.prediction_type === 'v_prediction';
    const sampleCoeff = Math.sqrt(aPrev / aT);
    const epsCoeff = (aPrev - aT) / (aT * Math.sqrt(bPrev) + Math.sqrt(aT * bT * aPrev));
    const out = new Float32Array(sample.length);
    for (let i = 0; i < out.length; i++) {
      const s = sample[i]!;
      const eps = v ? sqrtA * modelOutput[i]! + sqrtB * s : modelOutput[i]!;
      out[i] = sampleCoeff * s - epsCoeff * eps;
    }
    return out;
  }
}
