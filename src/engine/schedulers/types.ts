/**
 * The contract every scheduler implements. It mirrors diffusers' SchedulerMixin so the
 * pipeline loop reads like `pipeline_onnx_stable_diffusion.py`:
 *
 *   scheduler.setTimesteps(n)
 *   latents = noise * scheduler.initNoiseSigma
 *   for (const t of scheduler.timesteps) {
 *     const x = scheduler.scaleModelInput(latents, t)
 *     const eps = unet(x, t)
 *     latents = scheduler.step(eps, t, latents, noise)
 *   }
 *
 * Schedulers are pure math over typed arrays: no I/O, no onnxruntime. Samples are float32
 * (what the UNet consumes); per-timestep coefficients are computed in float64.
 */

export const SCHEDULER_NAMES = ['pndm', 'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m', 'lcm'] as const;
export type SchedulerName = (typeof SCHEDULER_NAMES)[number];

/** A source of standard-normal noise (ancestral and LCM schedulers draw from it). */
export interface NoiseSource {
  /** `n` independent N(0, 1) values, in the generator's stream order. */
  randn(n: number): Float32Array;
}

export interface Scheduler {
  readonly name: SchedulerName;
  /** How many model evaluations one step consumes in the loop (1 for every scheduler here). */
  readonly order: number;
  /** Standard deviation of the initial noise: latents = randn * initNoiseSigma. */
  readonly initNoiseSigma: number;
  /** The timesteps handed to the UNet, in order; valid after setTimesteps(). */
  readonly timesteps: Float64Array;
  setTimesteps(numInferenceSteps: number): void;
  /** Scales the denoising model input (identity for DDPM-style schedulers). Returns a new array. */
  scaleModelInput(sample: Float32Array, timestep: number): Float32Array;
  /**
   * One reverse-diffusion step: from the model output at `timestep` and the current sample,
   * returns the previous (less noisy) sample as a new array. `noise` is required by stochastic
   * schedulers (Euler ancestral, LCM between steps) and ignored by the others.
   */
  step(modelOutput: Float32Array, timestep: number, sample: Float32Array, noise?: NoiseSource): Float32Array;
  /**
   * The forward process at a timestep of the schedule: `original` noised to that timestep's
   * level with `noise` (image-to-image and inpainting start here). Returns a new array.
   */
  addNoise(original: Float32Array, noise: Float32Array, timestep: number): Float32Array;
}

/**
 * The keys of diffusers' `scheduler_config.json` that these schedulers read. All optional:
 * keys present in the file win, the rest take each algorithm's own defaults (what
 * `XScheduler.from_config(config)` does in diffusers).
 */
export interface SchedulerConfig {
  num_train_timesteps?: number;
  beta_start?: number;
  beta_end?: number;
  beta_schedule?: 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
  trained_betas?: number[] | null;
  prediction_type?: 'epsilon' | 'v_prediction' | 'sample';
  set_alpha_to_one?: boolean;
  steps_offset?: number;
  skip_prk_steps?: boolean;
  clip_sample?: boolean;
  clip_sample_range?: number;
  thresholding?: boolean;
  timestep_spacing?: 'linspace' | 'leading' | 'trailing';
  use_karras_sigmas?: boolean;
  interpolation_type?: 'linear' | 'log_linear';
  timestep_type?: 'discrete' | 'continuous';
  rescale_betas_zero_snr?: boolean;
  final_sigmas_type?: 'zero' | 'sigma_min';
  solver_order?: number;
  algorithm_type?: string;
  solver_type?: 'midpoint' | 'heun';
  lower_order_final?: boolean;
  euler_at_final?: boolean;
  original_inference_steps?: number;
  timestep_scaling?: number;
  [key: string]: unknown;
}
