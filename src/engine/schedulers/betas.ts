import type { SchedulerConfig } from './types.js';

/**
 * The training noise schedule shared by every scheduler: betas and their cumulative
 * alpha products. Accumulated in float64: the product of a thousand factors near one
 * loses digits quickly in float32.
 */
export interface NoiseSchedule {
  betas: Float64Array;
  alphas: Float64Array;
  alphasCumprod: Float64Array;
}

export function noiseSchedule(
  config: Required<Pick<SchedulerConfig, 'num_train_timesteps' | 'beta_start' | 'beta_end' | 'beta_schedule'>> & Pick<SchedulerConfig, 'trained_betas'>,
): NoiseSchedule {
  const n = config.num_train_timesteps;
  const betas = new Float64Array(n);
  if (config.trained_betas && config.trained_betas.length > 0) {
    if (config.trained_betas.length !== n) {
      throw new Error(`trained_betas has ${config.trained_betas.length} entries but num_train_timesteps is ${n}`);
    }
    betas.set(config.trained_betas);
  } else if (config.beta_schedule === 'linear') {
    for (let i = 0; i < n; i++) betas[i] = linspaceAt(config.beta_start, config.beta_end, n, i);
  } else if (config.beta_schedule === 'scaled_linear') {
    // Specific to latent diffusion: linear in sqrt(beta).
    const a = Math.sqrt(config.beta_start);
    const b = Math.sqrt(config.beta_end);
    for (let i = 0; i < n; i++) betas[i] = linspaceAt(a, b, n, i) ** 2;
  } else if (config.beta_schedule === 'squaredcos_cap_v2') {
    // Glide cosine schedule (betas_for_alpha_bar with max_beta 0.999).
    const alphaBar = (t: number) => Math.cos((((t + 0.008) / 1.008) * Math.PI) / 2) ** 2;
    for (let i = 0; i < n; i++) betas[i] = Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), 0.999);
  } else {
    throw new Error(`beta_schedule "${String(config.beta_schedule)}" is not one of linear, scaled_linear, squaredcos_cap_v2`);
  }
  const alphas = new Float64Array(n);
  const alphasCumprod = new Float64Array(n);
  let acc = 1;
  for (let i = 0; i < n; i++) {
    alphas[i] = 1 - betas[i]!;
    acc *= alphas[i]!;
    alphasCumprod[i] = acc;
  }
  return { betas, alphas, alphasCumprod };
}

/** numpy.linspace(start, stop, num)[i], computed the way numpy does (exact end point). */
export function linspaceAt(start: number, stop: number, num: number, i: number): number {
  if (num === 1) return start;
  if (i === num - 1) return stop;
  const step = (stop - start) / (num - 1);
  return start + i * step;
}
