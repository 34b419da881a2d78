/**
 * Euler sampler (Karras et al. 2022, Algorithm 2 without churn), a port of diffusers'
 * EulerDiscreteScheduler. It integrates the probability-flow ODE in sigma: the latents are
 * x = x0 + sigma * eps (not the DDPM sqrt(alphaBar) scaling), so the UNet input is
 * divided by sqrt(sigma^2 + 1) and the initial noise is scaled by the largest sigma.
 */
import type { NoiseSource, Scheduler, SchedulerConfig } from './types.js';
import {
  OptionReader,
  checkInferenceSteps,
  checkStepIndex,
  checkStepInputs,
  eulerTimesteps,
  float32Values,
  indexForTimestep,
  interpolateSigmas,
  karrasSigmas,
  logOfSigmas,
  sigmaToT,
  trainingSigmas,
  type BetaOptions,
  type PredictionType,
  type TimestepSpacing,
} from './sigma-family.js';
import { npLinspace } from './math.js';

const NAME = 'euler';

export interface EulerOptions extends BetaOptions {
  prediction_type: PredictionType;
  interpolation_type: 'linear' | 'log_linear';
  use_karras_sigmas: boolean;
  /** Karras end points; null means the schedule's own smallest / largest sigma. */
  sigma_min: number | null;
  sigma_max: number | null;
  timestep_spacing: TimestepSpacing;
  timestep_type: 'discrete' | 'continuous';
  steps_offset: number;
  final_sigmas_type: 'zero' | 'sigma_min';
}

export function eulerOptions(config: SchedulerConfig, scheduler = NAME): EulerOptions {
  const r = new OptionReader(scheduler, config);
  r.unsupported('rescale_betas_zero_snr', false);
  r.unsupported('use_exponential_sigmas', false);
  r.unsupported('use_beta_sigmas', false);
  return {
    ...r.betas(),
    prediction_type: r.choice('prediction_type', 'epsilon', ['epsilon', 'v_prediction', 'sample']),
    interpolation_type: r.choice('interpolation_type', 'linear', ['linear', 'log_linear']),
    use_karras_sigmas: r.bool('use_karras_sigmas', false),
    sigma_min: r.optionalNumber('sigma_min', { positive: true }),
    sigma_max: r.optionalNumber('sigma_max', { positive: true }),
    timestep_spacing: r.choice('timestep_spacing', 'linspace', ['linspace', 'leading', 'trailing']),
    timestep_type: r.choice('timestep_type', 'discrete', ['discrete', 'continuous']),
    steps_offset: r.number('steps_offset', 0, { integer: true, min: 0 }),
    final_sigmas_type: r.choice('final_sigmas_type', 'zero', ['zero', 'sigma_min']),
  };
}

/** The per-step schedule: timesteps for the UNet and the sigmas the integrator walks. */
export interface SigmaSchedule {
  timesteps: Float64Array;
  /** One more than the steps taken: sigmas[i + 1] is where step i lands (0 at the end). */
  sigmas: Float64Array;
}

export function eulerSchedule(o: EulerOptions, trainSigmas: Float64Array, n: number): SigmaSchedule {
  let timesteps = eulerTimesteps(o.timestep_spacing, o.num_train_timesteps, n, o.steps_offset);
  let sigmas: Float64Array;
  if (o.interpolation_type === 'linear') {
    sigmas = interpolateSigmas(timesteps, trainSigmas);
  } else {
    // diffusers' log_linear ignores the timesteps and spaces n + 1 sigmas log-evenly from the
    // largest to the smallest training sigma; with the final sigma appended below, the last
    // of the n + 2 values is never reached. Kept as is for parity.
    const lo = Math.log(trainSigmas[0]!);
    const hi = Math.log(trainSigmas[trainSigmas.length - 1]!);
    sigmas = npLinspace(hi, lo, n + 1).map(Math.exp);
  }
  if (o.use_karras_sigmas) {
    const sigmaMin = o.sigma_min ?? sigmas[sigmas.length - 1]!;
    const sigmaMax = o.sigma_max ?? sigmas[0]!;
    sigmas = karrasSigmas(sigmaMin, sigmaMax, n);
    const logSigmas = logOfSigmas(trainSigmas);
    // Karras sigmas fall between training sigmas, so the UNet gets fractional timesteps.
    timesteps = float32Values(sigmas.map((s) => sigmaToT(s, logSigmas)));
  }
  const last = o.final_sigmas_type === 'zero' ? 0 : trainSigmas[0]!;
  const all = float32Values([...sigmas, last]);
  if (o.timestep_type === 'continuous' && o.prediction_type === 'v_prediction') {
    // EDM-style conditioning: the UNet takes c_noise = ln(sigma) / 4 instead of t.
    timesteps = float32Values(all.subarray(0, all.length - 1).map((s) => 0.25 * Math.fround(Math.log(s))));
  }
  return { timesteps, sigmas: all };
}

/** Where an Euler-family run starts: noise scaled so x_T = sigma_max * eps matches training. */
export function initNoiseSigmaFor(spacing: TimestepSpacing, sigmas: Float64Array): number {
  const max = sigmas.reduce((m, s) => Math.max(m, s), 0);
  // diffusers' rule. x_T = x0 + sigma_max * eps has standard deviation sqrt(sigma_max^2 + 1)
  // for unit-variance x0; only leading spacing uses that, linspace and trailing use sigma_max
  // as k-diffusion does. The difference is under 0.3% for SD's sigma_max of 14.6.
  return spacing === 'leading' ? Math.fround(Math.sqrt(max * max + 1)) : max;
}

/** sample / sqrt(sigma^2 + 1): brings x = x0 + sigma * eps back to unit variance for the UNet. */
export function scaleBySigma(sample: Float32Array, sigma: number): Float32Array {
  const denom = Math.sqrt(sigma * sigma + 1);
  return sample.map((x) => x / denom);
}

/** The model's estimate of the clean sample x0 at noise level sigma (k-diffusion denoiser). */
export function predictOriginal(prediction: PredictionType, modelOutput: number, sample: number, sigma: number): number {
  if (prediction === 'epsilon') return sample - sigma * modelOutput;
  if (prediction === 'v_prediction') return modelOutput * (-sigma / Math.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1);
  return modelOutput;
}

/**
 * Adds noise at the given scheduler timestep: original + noise * sigma(t). For img2img,
 * where the run then starts at that timestep.
 */
export function addNoiseBySigma(
  scheduler: string,
  timesteps: Float64Array,
  sigmas: Float64Array,
  original: Float32Array,
  noise: Float32Array,
  timestep: number,
): Float32Array {
  if (original.length !== noise.length) {
    throw new Error(`${scheduler}: noise has ${noise.length} values but the sample has ${original.length}; they must match`);
  }
  const sigma = sigmas[indexForTimestep(scheduler, timesteps, timestep)]!;
  return original.map((x, i) => x + noise[i]! * sigma);
}

export class EulerDiscreteScheduler implements Scheduler {
  readonly name = NAME;
  readonly order = 1;
  readonly options: Readonly<EulerOptions>;
  private readonly trainSigmas: Float64Array;
  private schedule: SigmaSchedule;
  /** Which step the next step() performs; found from the timestep on first use, as diffusers does. */
  private stepIndex: number | null = null;

  constructor(config: SchedulerConfig = {}) {
    this.options = eulerOptions(config);
    this.trainSigmas = trainingSigmas(this.options);
    // Before setTimesteps diffusers exposes the full training schedule; so do we.
    const T = this.options.num_train_timesteps;
    this.schedule = {
      timesteps: float32Values(npLinspace(0, T - 1, T).reverse()),
      sigmas: float32Values([...this.trainSigmas.slice().reverse(), 0]),
    };
  }

  get timesteps(): Float64Array {
    return this.schedule.timesteps.slice();
  }

  /** The noise level at each step, plus the final one (0 unless final_sigmas_type is sigma_min). */
  get sigmas(): Float64Array {
    return this.schedule.sigmas.slice();
  }

  get initNoiseSigma(): number {
    return initNoiseSigmaFor(this.options.timestep_spacing, this.schedule.sigmas);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkInferenceSteps(NAME, numInferenceSteps, this.options.num_train_timesteps);
    this.schedule = eulerSchedule(this.options, this.trainSigmas, numInferenceSteps);
    this.stepIndex = null;
  }

  private currentIndex(timestep: number): number {
    this.stepIndex ??= indexForTimestep(NAME, this.schedule.timesteps, timestep);
    return this.stepIndex;
  }

  scaleModelInput(sample: Float32Array, timestep: number): Float32Array {
    const i = this.currentIndex(timestep);
    checkStepIndex(NAME, i, this.schedule.sigmas.length - 1);
    return scaleBySigma(sample, this.schedule.sigmas[i]!);
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, _noise?: NoiseSource): Float32Array {
    checkStepInputs(NAME, modelOutput, sample);
    const i = this.currentIndex(timestep);
    checkStepIndex(NAME, i, this.schedule.sigmas.length - 1);
    const sigma = this.schedule.sigmas[i]!;
    const dt = this.schedule.sigmas[i + 1]! - sigma;
    const prediction = this.options.prediction_type;
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      const x = sample[k]!;
      const derivative = (x - predictOriginal(prediction, modelOutput[k]!, x, sigma)) / sigma;
      out[k] = x + derivative * dt;
    }
    this.stepIndex = i + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    return addNoiseBySigma(NAME, this.schedule.timesteps, this.schedule.sigmas, original, noise, timestep);
  }
}
