import { invalid } from './params.js';

/**
 * Which timesteps an image-to-image run takes and at which one the input is noised. The two
 * references differ:
 *
 * - diffusers' ONNX SD img2img (and legacy inpaint): init = min(int(n * strength) + offset, n)
 *   with offset = the scheduler config's steps_offset; the input is noised at
 *   `timesteps[-init]` and the loop runs `timesteps[max(n - init + offset, 0):]`.
 * - optimum's SDXL img2img: init = min(int(n * strength), n); the loop runs
 *   `timesteps[n - init:]` and the input is noised at the first of them.
 */

export type Convention = 'diffusers-onnx' | 'optimum-sdxl';

export interface ImageToImagePlan {
  /** The timesteps the loop runs, in order. */
  timesteps: Float64Array;
  /** Where the input latents are noised before the loop. */
  noiseTimestep: number;
}

export function imageToImagePlan(timesteps: Float64Array, numSteps: number, strength: number, stepsOffset: number, convention: Convention): ImageToImagePlan {
  const n = numSteps;
  const len = timesteps.length;
  let plan: ImageToImagePlan;
  if (convention === 'diffusers-onnx') {
    const init = Math.min(Math.trunc(n * strength) + stepsOffset, n);
    // numpy's timesteps[-0] is timesteps[0].
    plan = { timesteps: timesteps.slice(Math.max(n - init + stepsOffset, 0)), noiseTimestep: timesteps[init === 0 ? 0 : len - init]! };
  } else {
    const init = Math.min(Math.trunc(n * strength), n);
    const run = timesteps.slice(Math.max(n - init, 0));
    plan = { timesteps: run, noiseTimestep: run[0] ?? Number.NaN };
  }
  if (plan.timesteps.length === 0) {
    invalid(`\`strength\` ${strength} with \`num_steps\` ${n} leaves no denoising step to run (the steps run are int(num_steps x strength)); raise either`);
  }
  return plan;
}

/**
 * The legacy inpainting blend after each step, in float32 as numpy does it:
 * `noisedInput * keep + latents * (1 - keep)`.
 */
export function keepMasked(latents: Float32Array, noisedInput: Float32Array, keep: Float32Array): Float32Array {
  const f = Math.fround;
  return latents.map((x, i) => f(noisedInput[i]! * keep[i]!) + f(x * f(1 - keep[i]!)));
}
