/**
 * Euler ancestral sampler, a port of diffusers' EulerAncestralDiscreteScheduler: each step
 * goes down to a lower noise level sigma_down with an Euler step and then adds fresh noise
 * of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. Stochastic: the result
 * depends on the NoiseSource handed to step().
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
  trainingSigmas,
  type BetaOptions,
  type TimestepSpacing,
} from './sigma-family.js';
import { addNoiseBySigma, initNoiseSigmaFor, predictOriginal, scaleBySigma } from './euler.js';
import { npLinspace } from './math.js';

const NAME = 'euler_ancestral';

export interface EulerAncestralOptions extends BetaOptions {
  prediction_type: 'epsilon' | 'v_prediction';
  timestep_spacing: TimestepSpacing;
  steps_offset: number;
}

export function eulerAncestralOptions(config: SchedulerConfig): EulerAncestralOptions {
  const r = new OptionReader(NAME, config);
  r.unsupported('rescale_betas_zero_snr', false);
  return {
    ...r.betas(),
    // diffusers raises NotImplementedError for "sample" in this scheduler.
    prediction_type: r.choice('prediction_type', 'epsilon', ['epsilon', 'v_prediction']),
    timestep_spacing: r.choice('timestep_spacing', 'linspace', ['linspace', 'leading', 'trailing']),
    steps_offset: r.number('steps_offset', 0, { integer: true, min: 0 }),
  };
}

export class EulerAncestralScheduler implements Scheduler {
  readonly name = NAME;
  readonly order = 1;
  readonly options: Readonly<EulerAncestralOptions>;
  private readonly trainSigmas: Float64Array;
  private _timesteps: Float64Array;
  /** Per-step noise levels (float32 values) plus a final 0. */
  private _sigmas: Float64Array;
  private stepIndex: number | null = null;

  constructor(config: SchedulerConfig = {}) {
    this.options = eulerAncestralOptions(config);
    this.trainSigmas = trainingSigmas(this.options);
    const T = this.options.num_train_timesteps;
    this._timesteps = npLinspace(0, T - 1, T).reverse();
    this._sigmas = float32Values([...this.trainSigmas.slice().reverse(), 0]);
  }

  get timesteps(): Float64Array {
    return this._timesteps.slice();
  }

  get sigmas(): Float64Array {
    return this._sigmas.slice();
  }

  get initNoiseSigma(): number {
    return initNoiseSigmaFor(this.options.timestep_spacing, this._sigmas);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkInferenceSteps(NAME, numInferenceSteps, this.options.num_train_timesteps);
    const o = this.options;
    this._timesteps = eulerTimesteps(o.timestep_spacing, o.num_train_timesteps, numInferenceSteps, o.steps_offset);
    this._sigmas = float32Values([...interpolateSigmas(this._timesteps, this.trainSigmas), 0]);
    this.stepIndex = null;
  }

  private currentIndex(timestep: number): number {
    this.stepIndex ??= indexForTimestep(NAME, this._timesteps, timestep);
    checkStepIndex(NAME, this.stepIndex, this._sigmas.length - 1);
    return this.stepIndex;
  }

  scaleModelInput(sample: Float32Array, timestep: number): Float32Array {
    return scaleBySigma(sample, this._sigmas[this.currentIndex(timestep)]!);
  }

  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, noise?: NoiseSource): Float32Array {
    checkStepInputs(NAME, modelOutput, sample);
    if (!noise) throw new Error(`${NAME}: step() needs a NoiseSource (the 4th argument); this sampler adds fresh noise every step`);
    const i = this.currentIndex(timestep);
    const sigma = this._sigmas[i]!;
    const next = this._sigmas[i + 1]!;
    const sigmaUp = Math.sqrt((next * next * (sigma * sigma - next * next)) / (sigma * sigma));
    const sigmaDown = Math.sqrt(next * next - sigmaUp * sigmaUp);
    const dt = sigmaDown - sigma;
    // Drawn on every step, the last included (where sigmaUp is 0), so the generator's stream
    // advances exactly as diffusers' does.
    const eps = noise.randn(sample.length);
    if (eps.length !== sample.length) {
      throw new Error(`${NAME}: NoiseSource returned ${eps.length} values, expected ${sample.length}`);
    }
    const prediction = this.options.prediction_type;
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      const x = sample[k]!;
      const derivative = (x - predictOriginal(prediction, modelOutput[k]!, x, sigma)) / sigma;
      out[k] = x + derivative * dt + eps[k]! * sigmaUp;
    }
    this.stepIndex = i + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array {
    return addNoiseBySigma(NAME, this._timesteps, this._sigmas, original, noise, timestep);
  }
}
