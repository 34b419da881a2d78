import { GraphBuilder } from './onnx-builder.js';

/**
 * Graph pieces the test UNets share: the noise level of a timestep and the ways a denoiser's
 * estimate of the clean latents becomes what the UNet returns.
 */

export interface TimestepInput {
  type: 'int64' | 'float32' | 'float16';
  /** 1 = shape [1] (what diffusers' ONNX pipeline feeds), 0 = a scalar. */
  rank: 0 | 1;
}

export type Prediction = 'epsilon' | 'v_prediction';

/**
 * sqrt(abar_t) and sqrt(1 - abar_t) as [-1, 1, 1, 1] from the timestep input. `sigmas[t] =
 * sqrt((1 - abar_t) / abar_t)` of the training schedule; fractional timesteps (Euler)
 * interpolate sigma linearly, exactly as the Euler scheduler does, so abar = 1 / (1 + sigma^2)
 * is consistent with the scheduler's.
 */
export function noiseLevel(g: GraphBuilder, tIn: string, sigmas: Float64Array): { a: string; s: string } {
  const n = sigmas.length;
  const t = g.op('Clip', [g.op('Reshape', [g.op('Cast', [tIn], { to: 1 }), g.i64([-1])]), g.scalar(0), g.scalar(n - 1)]);
  const t0 = g.op('Floor', [t]);
  const i0 = g.op('Cast', [t0], { to: 7 });
  const i1 = g.op('Min', [g.op('Add', [i0, g.i64([1], [])]), g.i64([n - 1], [])]);
  const sigTable = g.f32(sigmas, [n]);
  const s0 = g.op('Gather', [sigTable, i0], { axis: 0 });
  const s1 = g.op('Gather', [sigTable, i1], { axis: 0 });
  const sigma = g.op('Add', [s0, g.op('Mul', [g.op('Sub', [t, t0]), g.op('Sub', [s1, s0])])]);
  const abar = g.op('Reciprocal', [g.op('Add', [g.scalar(1), g.op('Mul', [sigma, sigma])])]);
  const shape4 = g.i64([-1, 1, 1, 1]);
  return {
    a: g.op('Reshape', [g.op('Sqrt', [abar]), shape4]),
    s: g.op('Reshape', [g.op('Sqrt', [g.op('Sub', [g.scalar(1), abar])]), shape4]),
  };
}

/** What a UNet trained for `prediction` returns when its estimate of the clean latents at x_t is x0. */
export function predictionFromX0(g: GraphBuilder, xt: string, x0: string, level: { a: string; s: string }, prediction: Prediction): string {
  const { a, s } = level;
  const eps = g.op('Div', [g.op('Sub', [xt, g.op('Mul', [a, x0])]), s]);
  return prediction === 'epsilon' ? eps : g.op('Sub', [g.op('Mul', [a, eps]), g.op('Mul', [s, x0])]);
}

/** Channels [from, to) of an NCHW tensor. */
export function channels(g: GraphBuilder, x: string, from: number, to: number): string {
  return g.op('Slice', [x, g.i64([from]), g.i64([to]), g.i64([1])]);
}

/** The sample's height and width times 8, as float [1, 1] each (the pixel size SDXL's time_ids name). */
export function pixelSize(g: GraphBuilder, sample: string): { height: string; width: string } {
  const shape = g.op('Shape', [sample]);
  const dim = (k: number) =>
    g.op('Reshape', [g.op('Mul', [g.op('Cast', [g.op('Gather', [shape, g.i64([k])], { axis: 0 })], { to: 1 }), g.scalar(8)]), g.i64([1, 1])]);
  return { height: dim(2), width: dim(3) };
}
