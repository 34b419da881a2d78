/**
 * Pieces shared by the k-diffusion style schedulers (Euler, Euler ancestral, DPM-Solver++),
 * which step in sigma = sqrt((1 - alphaBar) / alphaBar) rather than in alphaBar itself.
 *
 * diffusers keeps its per-step sigmas and (for these schedulers) timesteps as float32
 * tensors; we keep them as float64 arrays holding the same float32 values (Math.fround) so
 * the step index lookup and the coefficients see the numbers diffusers sees, while every
 * coefficient derived from them is computed in float64.
 */
import { noiseSchedule } from './betas.js';
import { npArange, npInterp, npLinspace, roundHalfEven } from './math.js';
import type { SchedulerConfig } from './types.js';

export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';
export type TimestepSpacing = 'linspace' | 'leading' | 'trailing';

/** The options every scheduler here reads from the beta schedule part of the config. */
export interface BetaOptions {
  num_train_timesteps: number;
  beta_start: number;
  beta_end: number;
  beta_schedule: 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
  trained_betas: number[] | null;
}

/** diffusers' defaults for the beta options (identical in all three schedulers). */
export const BETA_DEFAULTS: BetaOptions = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
};

/**
 * Reads typed options: a key present (and not null) in `config` wins, a missing one takes
 * the scheduler's default. Errors name the scheduler, the key, and what was expected.
 */
export class OptionReader {
  constructor(
    private readonly scheduler: string,
    private readonly config: SchedulerConfig,
  ) {}

  private raw(key: string): unknown {
    return this.config[key] ?? undefined;
  }

  private fail(key: string, expected: string, got: unknown): never {
    throw new Error(`${this.scheduler}: ${key} must be ${expected}, got ${JSON.stringify(got) ?? String(got)}`);
  }

  number(key: string, fallback: number, opts: { integer?: boolean; min?: number; positive?: boolean } = {}): number {
    const v = this.raw(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'number' || Number.isNaN(v)) this.fail(key, 'a number', v);
    if (opts.integer && !Number.isInteger(v)) this.fail(key, 'an integer', v);
    if (opts.min !== undefined && v < opts.min) this.fail(key, `>= ${opts.min}`, v);
    if (opts.positive && !(v > 0)) this.fail(key, 'a positive number', v);
    return v;
  }

  optionalNumber(key: string, opts: { positive?: boolean } = {}): number | null {
    const v = this.raw(key);
    if (v === undefined) return null;
    return this.number(key, 0, opts);
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.raw(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') this.fail(key, 'true or false', v);
    return v;
  }

  choice<T extends string>(key: string, fallback: T, allowed: readonly T[]): T {
    const v = this.raw(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
      this.fail(key, `one of ${allowed.join(', ')}`, v);
    }
    return v as T;
  }

  /** A diffusers option this port does not implement: accepted only at its inert value. */
  unsupported(key: string, inert: unknown): void {
    const v = this.raw(key);
    if (v !== undefined && v !== inert) {
      throw new Error(`${this.scheduler}: ${key}=${JSON.stringify(v)} is not supported (only ${JSON.stringify(inert)})`);
    }
  }

  betas(): BetaOptions {
    const trained = this.raw('trained_betas');
    if (trained !== undefined && !(Array.isArray(trained) && trained.every((b) => typeof b === 'number'))) {
      this.fail('trained_betas', 'an array of numbers or null', trained);
    }
    return {
      num_train_timesteps: this.number('num_train_timesteps', BETA_DEFAULTS.num_train_timesteps, { integer: true, min: 2 }),
      beta_start: this.number('beta_start', BETA_DEFAULTS.beta_start, { positive: true }),
      beta_end: this.number('beta_end', BETA_DEFAULTS.beta_end, { positive: true }),
      beta_schedule: this.choice('beta_schedule', BETA_DEFAULTS.beta_schedule, ['linear', 'scaled_linear', 'squaredcos_cap_v2']),
      trained_betas: trained ?? null,
    };
  }
}

/**
 * diffusers' training schedule for these schedulers, rounded the way its torch tensors are:
 * betas and alphas = 1 - beta in float32, alphas_cumprod accumulated in double (torch's CPU
 * cumprod accumulator) and stored as float32, sigma computed in float32. The float32
 * rounding of each alpha moves sigma_max by ~1e-6 relative against a pure float64
 * schedule, which diffusers' own reference sums resolve (e.g. 57062.93 +- 0.01 for Euler
 * with add_noise), so parity needs the same rounding. Coefficients derived from these
 * values are still computed in float64.
 */
export function trainingSchedule(betas: BetaOptions): { alphasCumprod: Float64Array; sigmas: Float64Array } {
  const f = Math.fround;
  const { betas: b } = noiseSchedule(betas);
  const alphasCumprod = new Float64Array(b.length);
  let acc = 1;
  for (let i = 0; i < b.length; i++) {
    acc *= f(1 - f(b[i]!));
    alphasCumprod[i] = f(acc);
  }
  const sigmas = alphasCumprod.map((a) => f(Math.sqrt(f(f(1 - a) / a))));
  return { alphasCumprod, sigmas };
}

/**
 * Training-time sigmas, indexed by training timestep (ascending: sigma grows with t).
 * For SD 1.5's schedule they run from 0.0292 at t=0 to 14.6146 at t=999.
 */
export function trainingSigmas(betas: BetaOptions): Float64Array {
  return trainingSchedule(betas).sigmas;
}

/** np.log over diffusers' float32 sigma array, which yields float32 logs. */
export function logOfSigmas(trainSigmas: Float64Array): Float64Array {
  return trainSigmas.map((s) => Math.fround(Math.log(s)));
}

/** sigma at each (possibly fractional) timestep by linear interpolation, as np.interp does. */
export function interpolateSigmas(timesteps: ArrayLike<number>, trainSigmas: Float64Array): Float64Array {
  const xp = Float64Array.from({ length: trainSigmas.length }, (_, i) => i);
  return Float64Array.from(timesteps, (t) => npInterp(t, xp, trainSigmas));
}

/**
 * The (fractional) training timestep whose sigma is `sigma`: diffusers' _sigma_to_t, a
 * linear interpolation in log-sigma between the two neighbouring training sigmas, clamped
 * to [0, T-1]. `logSigmas` must be ascending.
 */
export function sigmaToT(sigma: number, logSigmas: Float64Array): number {
  const n = logSigmas.length;
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  // Last index whose log-sigma is <= logSigma (0 when none is), kept one short of the end
  // so that high = low + 1 exists.
  let low = 0;
  for (let i = 0; i < n; i++) if (logSigma - logSigmas[i]! >= 0) low = i;
  low = Math.min(low, n - 2);
  const lo = logSigmas[low]!;
  const hi = logSigmas[low + 1]!;
  const w = Math.min(Math.max((lo - logSigma) / (lo - hi), 0), 1);
  return (1 - w) * low + w * (low + 1);
}

/**
 * Karras et al. (2022) noise levels: evenly spaced in sigma^(1/rho), rho = 7, from
 * sigmaMax down to sigmaMin inclusive. Concentrates steps at low noise.
 */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): Float64Array {
  const rho = 7;
  const minInv = sigmaMin ** (1 / rho);
  const maxInv = sigmaMax ** (1 / rho);
  return npLinspace(0, 1, n).map((r) => (maxInv + r * (minInv - maxInv)) ** rho);
}

export function checkInferenceSteps(scheduler: string, n: number, numTrainTimesteps: number): void {
  if (!Number.isInteger(n) || n < 1 || n > numTrainTimesteps) {
    throw new Error(`${scheduler}: numInferenceSteps must be an integer from 1 to ${numTrainTimesteps}, got ${n}`);
  }
}

/**
 * Position of `timestep` in the schedule, as diffusers' index_for_timestep picks it: when a
 * value occurs twice (possible with rounded timesteps) the second occurrence, so a run that
 * starts mid-schedule (img2img) does not skip a sigma.
 */
export function indexForTimestep(scheduler: string, timesteps: Float64Array, timestep: number): number {
  const hits: number[] = [];
  for (let i = 0; i < timesteps.length && hits.length < 2; i++) if (timesteps[i] === timestep) hits.push(i);
  const index = hits.length > 1 ? hits[1] : hits[0];
  if (index === undefined) {
    throw new Error(`${scheduler}: timestep ${timestep} is not in the schedule; pass one of scheduler.timesteps (call setTimesteps first)`);
  }
  return index;
}

export function checkStepInputs(scheduler: string, modelOutput: Float32Array, sample: Float32Array): void {
  if (modelOutput.length !== sample.length) {
    throw new Error(`${scheduler}: modelOutput has ${modelOutput.length} values but sample has ${sample.length}; they must match`);
  }
}

/** Throws unless a step at `index` has a following sigma to step to. */
export function checkStepIndex(scheduler: string, index: number, numSteps: number): void {
  if (index >= numSteps) {
    throw new Error(`${scheduler}: step() called ${index + 1} times but the schedule has ${numSteps} steps; call setTimesteps again`);
  }
}

export function float32Values(values: ArrayLike<number>): Float64Array {
  return Float64Array.from(values, Math.fround);
}

/**
 * The Euler schedulers' timesteps, descending, as the float32 values diffusers stores.
 * linspace: evenly spaced over [0, T-1], fractional in general (e.g. 978.6122 for 50 steps).
 * leading: multiples of floor(T/n) plus steps_offset. trailing: T - 1 downwards in steps of
 * T/n, rounded half to even, exactly n of them.
 */
export function eulerTimesteps(spacing: TimestepSpacing, numTrain: number, n: number, stepsOffset: number): Float64Array {
  let ts: Float64Array;
  if (spacing === 'linspace') {
    ts = npLinspace(0, numTrain - 1, n).reverse();
  } else if (spacing === 'leading') {
    const ratio = Math.floor(numTrain / n);
    ts = Float64Array.from({ length: n }, (_, i) => (n - 1 - i) * ratio + stepsOffset);
  } else {
    // As in spacedTimesteps (ddim.ts): for some n (e.g. T = 1000, n = 61) numpy's arange yields
    // an extra element ~1e-13 that diffusers turns into timestep -1, an extra step the caller did
    // not ask for (and, past the end of the sigma table, a NaN here). Only the first n are kept.
    ts = npArange(numTrain, 0, -numTrain / n)
      .slice(0, n)
      .map((t) => roundHalfEven(t) - 1);
  }
  return float32Values(ts);
}
