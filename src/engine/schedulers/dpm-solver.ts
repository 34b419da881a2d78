/**
 * DPM-Solver++ multistep (Lu et al. 2022), a port of diffusers' DPMSolverMultistepScheduler
 * for algorithm_type "dpmsolver++": it integrates the diffusion ODE for the data prediction
 * x0 exactly in the half-log-SNR lambda = log(alpha_t / sigma_t), and extrapolates x0 from
 * the previous step's estimate (2M: solver_order 2) for a second-order method at one UNet
 * call per step.
 *
 * Two noise parameterisations meet here. The schedule is kept, as in diffusers, in the
 * k-diffusion sigma = sqrt((1 - alphaBar) / alphaBar); the solver works with the VP pair
 * alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma * alpha_t. The latents are VP latents
 * (init noise sigma 1, no input scaling).
 *
 * "DPM++ 2M Karras" is this class with use_karras_sigmas: true. diffusers' default is false
 * and this class keeps diffusers' defaults; the service's scheduler factory turns it on.
 */
import type { NoiseSource, Scheduler, SchedulerConfig } from './types.js';
import {
  OptionReader,
  checkInferenceSteps,
  checkStepIndex,
  checkStepInputs,
  float32Values,
  indexForTimestep,
  interpolateSigmas,
  karrasSigmas,
  logOfSigmas,
  sigmaToT,
  trainingSchedule,
  trainingSigmas,
  type BetaOptions,
  type PredictionType,
  type TimestepSpacing,
} from './sigma-family.js';
import { npArange, npLinspace, roundHalfEven } from './math.js';

const NAME = 'dpmpp_2m';

export interface DpmSolverOptions extends BetaOptions {
  solver_order: 1 | 2 | 3;
  prediction_type: PredictionType;
  algorithm_type: 'dpmsolver++';
  solver_type: 'midpoint' | 'heun';
  /** Drop to first order on the last step (and second order on the one before) when n < 15. */
  lower_order_final: boolean;
  /** Always take a first-order (Euler) last step. */
  euler_at_final: boolean;
  use_karras_sigmas: boolean;
  /** Steps evenly spaced in log sigma (diffusers' "Lu lambdas"). */
  use_lu_lambdas: boolean;
  final_sigmas_type: 'zero' | 'sigma_min';
  /** Timesteps whose lambda falls below this are cut from the schedule (-Infinity: none). */
  lambda_min_clipped: number;
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
}

export function dpmSolverOptions(config: SchedulerConfig): DpmSolverOptions {
  const r = new OptionReader(NAME, config);
  r.unsupported('thresholding', false);
  r.unsupported('rescale_betas_zero_snr', false);
  r.unsupported('use_exponential_sigmas', false);
  r.unsupported('use_beta_sigmas', false);
  r.unsupported('use_flow_sigmas', false);
  r.unsupported('use_dynamic_shifting', false);
  r.unsupported('variance_type', undefined);
  const o: DpmSolverOptions = {
    ...r.betas(),
    solver_order: r.number('solver_order', 2, { integer: true, min: 1 }) as 1 | 2 | 3,
    prediction_type: r.choice('prediction_type', 'epsilon', ['epsilon', 'v_prediction', 'sample']),
    algorithm_type: algorithmType(r),
    solver_type: mapSolverType(r.choice('solver_type', 'midpoint', ['midpoint', 'heun', 'logrho', 'bh1', 'bh2'])),
    lower_order_final: r.bool('lower_order_final', true),
    euler_at_final: r.bool('euler_at_final', false),
    use_karras_sigmas: r.bool('use_karras_sigmas', false),
    use_lu_lambdas: r.bool('use_lu_lambdas', false),
    final_sigmas_type: r.choice('final_sigmas_type', 'zero', ['zero', 'sigma_min']),
    lambda_min_clipped: r.number('lambda_min_clipped', -Infinity),
    timestep_spacing: r.choice('timestep_spacing', 'linspace', ['linspace', 'leading', 'trailing']),
    steps_offset: r.number('steps_offset', 0, { integer: true, min: 0 }),
  };
  if (o.solver_order > 3) throw new Error(`${NAME}: solver_order must be 1, 2 or 3, got ${o.solver_order}`);
  if (o.use_karras_sigmas && o.use_lu_lambdas) throw new Error(`${NAME}: use_karras_sigmas and use_lu_lambdas cannot both be true`);
  return o;
}

/** Only DPM-Solver++ (ODE) is ported; "deis" is what diffusers itself maps onto it. */
function algorithmType(r: OptionReader): 'dpmsolver++' {
  r.choice('algorithm_type', 'dpmsolver++', ['dpmsolver++', 'deis']);
  return 'dpmsolver++';
}

/** diffusers maps the UniPC/DEIS solver types onto midpoint when a config is switched over. */
function mapSolverType(t: 'midpoint' | 'heun' | 'logrho' | 'bh1' | 'bh2'): 'midpoint' | 'heun' {
  return t === 'heun' ? 'heun' : 'midpoint';
}

export interface DpmSchedule {
  /** Integer timesteps for the UNet, descending. */
  timesteps: Float64Array;
  /** k-diffusion sigma at each step plus the final one (float32 values). */
  sigmas: Float64Array;
}

export function dpmSchedule(o: DpmSolverOptions, n: number): DpmSchedule {
  const T = o.num_train_timesteps;
  const { alphasCumprod, sigmas: trainSigmas } = trainingSchedule(o);
  // lambda_t decreases with t; count the training steps (from the top) below the clip.
  let clipped = 0;
  for (let t = T - 1; t >= 0; t--) {
    const a = alphasCumprod[t]!;
    if (0.5 * Math.log(a) - 0.5 * Math.log(1 - a) < o.lambda_min_clipped) clipped++;
    else break;
  }
  const lastTimestep = T - clipped;

  let timesteps: Float64Array;
  if (o.timestep_spacing === 'linspace') {
    // n + 1 points over [0, last - 1], dropping the 0: rounded half to even, so 499.5 -> 500.
    timesteps = npLinspace(0, lastTimestep - 1, n + 1)
      .map(roundHalfEven)
      .reverse()
      .subarray(0, n);
  } else if (o.timestep_spacing === 'leading') {
    const ratio = Math.floor(lastTimestep / (n + 1));
    timesteps = Float64Array.from({ length: n }, (_, i) => (n - i) * ratio + o.steps_offset);
  } else {
    timesteps = npArange(lastTimestep, 0, -T / n).map((t) => roundHalfEven(t) - 1);
  }

  let sigmas: Float64Array;
  const logSigmas = logOfSigmas(trainSigmas);
  // diffusers keeps the raw sigma_to_t values for the cosine schedule only.
  const toTimestep = (s: number) => (o.beta_schedule === 'squaredcos_cap_v2' ? Math.trunc : roundHalfEven)(sigmaToT(s, logSigmas));
  if (o.use_karras_sigmas) {
    sigmas = karrasSigmas(trainSigmas[0]!, trainSigmas[T - 1]!, n);
    // The solver steps through the exact Karras sigmas; the UNet is told the nearest
    // training timestep.
    timesteps = sigmas.map(toTimestep);
  } else if (o.use_lu_lambdas) {
    const logMax = logSigmas[T - 1]!;
    const logMin = logSigmas[0]!;
    sigmas = npLinspace(0, 1, n).map((r) => Math.exp(logMax + r * (logMin - logMax)));
    timesteps = sigmas.map(toTimestep);
  } else {
    sigmas = interpolateSigmas(timesteps, trainSigmas);
  }
  const last = o.final_sigmas_type === 'zero' ? 0 : trainSigmas[0]!;
  return { timesteps: Float64Array.from(timesteps), sigmas: float32Values([...sigmas, last]) };
}

/** VP coefficients and half-log-SNR for a k-diffusion sigma. lambda is +Infinity at sigma 0. */
function vp(sigma: number): { alpha: number; sigma: number; lambda: number } {
  const alpha = 1 / Math.sqrt(sigma * sigma + 1);
  const s = sigma * alpha;
  return { alpha, sigma: s, lambda: Math.log(alpha) - Math.log(s) };
}

export class DpmSolverMultistepScheduler implements Scheduler {
  readonly name = NAME;
  readonly order = 1;
  readonly initNoiseSigma = 1;
  readonly options: Readonly<DpmSolverOptions>;
  private schedule: DpmSchedule;
  private ready = false;
  private stepIndex: number | null = null;
  /** x0 estimates of the last solver_order steps, oldest first. */
  private x0History: (Float64Array | null)[];
  /** How many steps have fed the history, capped at solver_order (warm-up counter). */
  private lowerOrderNums = 0;

  constructor(config: SchedulerConfig = {}) {
    this.options = dpmSolverOptions(config);
    const T = this.options.num_train_timesteps;
    this.schedule = {
      timesteps: float32Values(npLinspace(0, T - 1, T).reverse()),
      sigmas: float32Values(trainingSigmas(this.options)),
    };
    this.x0History = new Array<Float64Array | null>(this.options.solver_order).fill(null);
  }

  get timesteps(): Float64Array {
    return this.schedule.timesteps.slice();
  }

  get sigmas(): Float64Array {
    return this.schedule.sigmas.slice();
  }

  setTimesteps(numInferenceSteps: number): void {
    checkInferenceSteps(NAME, numInferenceSteps, this.options.num_train_timesteps);
    this.schedule = dpmSchedule(this.options, numInferenceSteps);
    this.ready = true;
    this.stepIndex = null;
    this.x0History.fill(null);
    this.lowerOrderNums = 0;
  }

  scaleModelInput(sample: Float32Array, _timestep: number): Float32Array {
    return sample.slice();
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, _noise?: NoiseSource): Float32Array {
    checkStepInputs(NAME, modelOutput, sample);
    if (!this.ready) throw new Error(`${NAME}: call setTimesteps() before step()`);
    const { timesteps, sigmas } = this.schedule;
    const i = (this.stepIndex ??= indexForTimestep(NAME, timesteps, timestep));
    checkStepIndex(NAME, i, timesteps.length);
    const o = this.options;
    const n = timesteps.length;
    // Lower orders near the end keep few-step runs stable; a final sigma of 0 always ends
    // with a first-order step (lambda is infinite there, so higher orders are undefined).
    const lowerOrderFinal = i === n - 1 && (o.euler_at_final || (o.lower_order_final && n < 15) || o.final_sigmas_type === 'zero');
    const lowerOrderSecond = i === n - 2 && o.lower_order_final && n < 15;

    const x0 = this.dataPrediction(modelOutput, sample, sigmas[i]!);
    this.x0History.shift();
    this.x0History.push(x0);

    let prev: Float32Array;
    if (o.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal) {
      prev = this.firstOrder(x0, sample, sigmas[i]!, sigmas[i + 1]!);
    } else if (o.solver_order === 2 || this.lowerOrderNums < 2 || lowerOrderSecond) {
      prev = this.secondOrder(sample, sigmas[i - 1]!, sigmas[i]!, sigmas[i + 1]!);
    } else {
      prev = this.thirdOrder(sample, sigmas[i - 2]!, sigmas[i - 1]!, sigmas[i]!, sigmas[i + 1]!);
    }
    if (this.lowerOrderNums < o.solver_order) this.lowerOrderNums++;
    this.stepIndex = i + 1;
    return prev;
  }

  /** diffusers' convert_model_output for dpmsolver++: the model's x0 estimate at this sigma. */
  private dataPrediction(modelOutput: Float32Array, sample: Float32Array, sigma: number): Float64Array {
    const { alpha, sigma: s } = vp(sigma);
    const x0 = new Float64Array(sample.length);
    const type = this.options.prediction_type;
    for (let k = 0; k < x0.length; k++) {
      const m = modelOutput[k]!;
      const x = sample[k]!;
      x0[k] = type === 'epsilon' ? (x - s * m) / alpha : type === 'v_prediction' ? alpha * x - s * m : m;
    }
    return x0;
  }

  private history(back: number): Float64Array {
    const h = this.x0History[this.x0History.length - 1 - back];
    if (!h) throw new Error(`${NAME}: internal error, missing model output ${back} steps back`);
    return h;
  }

  private firstOrder(x0: Float64Array, sample: Float32Array, sigmaS: number, sigmaT: number): Float32Array {
    const s = vp(sigmaS);
    const t = vp(sigmaT);
    const h = t.lambda - s.lambda;
    const a = t.sigma / s.sigma;
    const b = t.alpha * (Math.exp(-h) - 1);
    return sample.map((x, k) => a * x - b * x0[k]!);
  }

  private secondOrder(sample: Float32Array, sigmaS1: number, sigmaS0: number, sigmaT: number): Float32Array {
    const s1 = vp(sigmaS1);
    const s0 = vp(sigmaS0);
    const t = vp(sigmaT);
    const h = t.lambda - s0.lambda;
    const r0 = (s0.lambda - s1.lambda) / h;
    const m0 = this.history(0);
    const m1 = this.history(1);
    const a = t.sigma / s0.sigma;
    const em1 = Math.exp(-h) - 1;
    const c0 = t.alpha * em1;
    // D1 = (m0 - m1) / r0 enters with -0.5 * alpha * (e^-h - 1) (midpoint) or
    // alpha * ((e^-h - 1) / h + 1) (heun).
    const c1 = this.options.solver_type === 'midpoint' ? -0.5 * t.alpha * em1 : t.alpha * (em1 / h + 1);
    return sample.map((x, k) => {
      const d1 = (m0[k]! - m1[k]!) / r0;
      return a * x - c0 * m0[k]! + c1 * d1;
    });
  }

  private thirdOrder(sample: Float32Array, sigmaS2: number, sigmaS1: number, sigmaS0: number, sigmaT: number): Float32Array {
    const s2 = vp(sigmaS2);
    const s1 = vp(sigmaS1);
    const s0 = vp(sigmaS0);
    const t = vp(sigmaT);
    const h = t.lambda - s0.lambda;
    const r0 = (s0.lambda - s1.lambda) / h;
    const r1 = (s1.lambda - s2.lambda) / h;
    const m0 = this.history(0);
    const m1 = this.history(1);
    const m2 = this.history(2);
    const em1 = Math.exp(-h) - 1;
    const a = t.sigma / s0.sigma;
    const c0 = t.alpha * em1;
    const c1 = t.alpha * (em1 / h + 1);
    const c2 = t.alpha * ((em1 + h) / (h * h) - 0.5);
    return sample.map((x, k) => {
      const d10 = (m0[k]! - m1[k]!) / r0;
      const d11 = (m1[k]! - m2[k]!) / r1;
      const d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11);
      const d2 = (d10 - d11) / (r0 + r1);
      return a * x - c0 * m0[k]! + c1 * d1 - c2 * d2;
    });
  }

  /**
   * alpha_t * original + sigma_t * noise at a scheduler timestep (VP forward process), for
   * img2img runs that start at that timestep.
   */
  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    if (original.length !== noise.length) {
      throw new Error(`${NAME}: noise has ${noise.length} values but the sample has ${original.length}; they must match`);
    }
    const { alpha, sigma } = vp(this.schedule.sigmas[indexForTimestep(NAME, this.schedule.timesteps, timestep)]!);
    return original.map((x, k) => alpha * x + sigma * noise[k]!);
  }
}
