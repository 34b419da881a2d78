import { GraphBuilder, type ElemType, type SerializedModel } from './onnx-builder.js';
import { BACKGROUND, BASE_RADIUS, DEFAULT_COLOUR, F, ORACLE_HIDDEN_SIZE, POSITION_STEP, wordFeatures } from './oracle-spec.js';

/**
 * ONNX graphs of the oracle model (see oracle-spec.ts for what it means). Its UNet is the
 * exact noise predictor for the prompt's target latent T:
 *
 *   eps(x_t, t) = (x_t - sqrt(abar_t) T) / sqrt(1 - abar_t)
 *
 * so every correct scheduler lands on T, up to what its schedule leaves by design.
 */

export const VAE_SCALING_FACTOR = 0.18215;
const TOKENS = 77;

export interface TimestepInput {
  type: 'int64' | 'float32' | 'float16';
  /** 1 = shape [1] (what diffusers' ONNX pipeline feeds), 0 = a scalar. */
  rank: 0 | 1;
}

/** input_ids -> last_hidden_state: each token's row of a word-feature table. */
export function oracleTextEncoder(vocab: Map<string, number>, idsType: 'int32' | 'int64' = 'int32'): SerializedModel {
  const g = new GraphBuilder('oracle_text_encoder');
  const ids = g.input('input_ids', idsType, ['batch', TOKENS]);
  const table = new Float32Array(vocab.size * ORACLE_HIDDEN_SIZE);
  for (const [token, id] of vocab) {
    if (!token.endsWith('</w>')) continue;
    table.set(wordFeatures(token.slice(0, -4)), id * ORACLE_HIDDEN_SIZE);
  }
  const emb = g.f32(table, [vocab.size, ORACLE_HIDDEN_SIZE]);
  const hidden = g.op('Gather', [emb, ids], { axis: 0 });
  g.named(hidden, 'last_hidden_state');
  g.named(g.op('ReduceSum', [hidden, g.i64([1])], { keepdims: 0 }), 'pooler_output');
  g.output('last_hidden_state', 'float32', ['batch', TOKENS, ORACLE_HIDDEN_SIZE]);
  g.output('pooler_output', 'float32', ['batch', ORACLE_HIDDEN_SIZE]);
  return g.serialize();
}

/**
 * (sample, timestep, encoder_hidden_states) -> out_sample. `sigmas[t] = sqrt((1 - abar_t) / abar_t)`
 * of the training schedule; fractional timesteps (Euler) interpolate sigma linearly, exactly as
 * the Euler scheduler does, so abar = 1 / (1 + sigma^2) is consistent with the scheduler's.
 */
export function oracleUnet(sigmas: Float64Array, timestep: TimestepInput = { type: 'int64', rank: 1 }): SerializedModel {
  const g = new GraphBuilder('oracle_unet');
  const sample = g.input('sample', 'float32', ['batch', 4, 'height', 'width']);
  const tIn = g.input('timestep', timestep.type, timestep.rank === 1 ? [1] : []);
  const ehs = g.input('encoder_hidden_states', 'float32', ['batch', TOKENS, ORACLE_HIDDEN_SIZE]);

  const target = targetLatent(g, g.op('ReduceSum', [ehs, g.i64([1])], { keepdims: 0 }), sample);

  // Noise level of the timestep, as [-1, 1, 1, 1] to broadcast over the batch.
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
  const a = g.op('Reshape', [g.op('Sqrt', [abar]), shape4]);
  const s = g.op('Reshape', [g.op('Sqrt', [g.op('Sub', [g.scalar(1), abar])]), shape4]);

  const eps = g.op('Div', [g.op('Sub', [sample, g.op('Mul', [a, target])]), s]);
  g.named(eps, 'out_sample');
  g.output('out_sample', 'float32', ['batch', 4, 'height', 'width']);
  return g.serialize();
}

/** Builds T [B, 4, h, w] from the summed features [B, D] and the sample's spatial size. */
function targetLatent(g: GraphBuilder, feats: string, sample: string): string {
  const col = (k: number) => g.op('Gather', [feats, g.i64([k])], { axis: 1 }); // [B, 1]
  const atLeast1 = (v: string) => g.op('Max', [v, g.scalar(1)]);
  const isSet = (v: string) => g.op('Greater', [v, g.scalar(0.5)]);
  const toB11 = (v: string) => g.op('Unsqueeze', [v, g.i64([2])]); // [B, 1] -> [B, 1, 1]

  // Colour: the mean of the colour words, else the default.
  const rgb = g.op('Gather', [feats, g.i64([F.r, F.g, F.b])], { axis: 1 }); // [B, 3]
  const colourCount = col(F.colourCount);
  const colour = g.op('Where', [isSet(colourCount), g.op('Div', [rgb, atLeast1(colourCount)]), g.f32(DEFAULT_COLOUR, [1, 3])]);

  // Geometry in units of the frame; y grows downwards like image rows.
  const centre = (sum: number, count: number) =>
    toB11(g.op('Add', [g.scalar(0.5), g.op('Div', [g.op('Mul', [g.scalar(POSITION_STEP), col(sum)]), atLeast1(col(count))])]));
  const cx = centre(F.xSum, F.xCount);
  const cy = centre(F.ySum, F.yCount);
  const sizeCount = col(F.sizeCount);
  const size = g.op('Where', [isSet(sizeCount), g.op('Div', [col(F.sizeSum), atLeast1(sizeCount)]), g.scalar(1)]);
  const radius = toB11(g.op('Mul', [size, g.scalar(BASE_RADIUS)]));

  // Pixel-centre coordinates from the sample's own height and width.
  const shape = g.op('Shape', [sample]);
  const axis = (dim: number, to: number[]) => {
    const len = g.op('Gather', [shape, g.i64([dim], [])], { axis: 0 });
    const lenF = g.op('Cast', [len], { to: 1 });
    const idx = g.op('Cast', [g.op('Range', [g.i64([0], []), len, g.i64([1], [])])], { to: 1 });
    return g.op('Reshape', [g.op('Div', [g.op('Add', [idx, g.scalar(0.5)]), lenF]), g.i64(to)]);
  };
  const dx = g.op('Sub', [axis(3, [1, 1, -1]), cx]); // [B, 1, w]
  const dy = g.op('Sub', [axis(2, [1, -1, 1]), cy]); // [B, h, 1]

  const asFloat = (b: string) => g.op('Cast', [b], { to: 1 });
  const circle = g.op('LessOrEqual', [g.op('Add', [g.op('Mul', [dx, dx]), g.op('Mul', [dy, dy])]), g.op('Mul', [radius, radius])]);
  const square = g.op('LessOrEqual', [g.op('Max', [g.op('Abs', [dx]), g.op('Abs', [dy])]), radius]);
  const wantCircle = toB11(asFloat(isSet(col(F.circle))));
  const wantSquare = toB11(asFloat(isSet(col(F.square))));
  const shapeMask = g.op('Max', [g.op('Mul', [asFloat(circle), wantCircle]), g.op('Mul', [asFloat(square), wantSquare])]);
  const hasShape = toB11(isSet(g.op('Add', [col(F.circle), col(F.square)])));
  const mask = g.op('Where', [hasShape, shapeMask, toB11(asFloat(isSet(colourCount)))]); // [B, h, w]
  const mask4 = g.op('Unsqueeze', [mask, g.i64([1])]); // [B, 1, h, w]

  // RGB into latent channels 0..2, channel 3 stays 0.
  const toLatent = g.f32([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], [3, 4]);
  const colour4 = g.op('Reshape', [g.op('MatMul', [colour, toLatent]), g.i64([-1, 4, 1, 1])]);
  const bg4 = g.f32([...BACKGROUND, 0], [1, 4, 1, 1]);
  return g.op('Add', [bg4, g.op('Mul', [mask4, g.op('Sub', [colour4, bg4])])]);
}

/** latent_sample [B,4,h,w] -> sample [B,3,8h,8w]: channels 0..2 times the scaling factor, 8x nearest. */
export function oracleVaeDecoder(): SerializedModel {
  const g = new GraphBuilder('oracle_vae_decoder');
  const z = g.input('latent_sample', 'float32', ['batch', 4, 'latent_height', 'latent_width']);
  const w = new Float32Array(3 * 4);
  for (let c = 0; c < 3; c++) w[c * 4 + c] = VAE_SCALING_FACTOR;
  const rgb = g.op('Conv', [z, g.f32(w, [3, 4, 1, 1])], { kernel_shape: [1, 1] });
  const up = g.op('Resize', [rgb, '', g.f32([1, 1, 8, 8], [4])], { mode: 'nearest', nearest_mode: 'floor', coordinate_transformation_mode: 'asymmetric' });
  g.named(up, 'sample');
  g.output('sample', 'float32', ['batch', 3, 'height', 'width']);
  return g.serialize();
}

/** sample [B,3,H,W] -> latent_sample [B,4,H/8,W/8]: the decoder's inverse on 8x8 block means. */
export function oracleVaeEncoder(): SerializedModel {
  const g = new GraphBuilder('oracle_vae_encoder');
  const x = g.input('sample', 'float32', ['batch', 3, 'height', 'width']);
  const pooled = g.op('AveragePool', [x], { kernel_shape: [8, 8], strides: [8, 8] });
  const w = new Float32Array(4 * 3);
  for (let c = 0; c < 3; c++) w[c * 3 + c] = 1 / VAE_SCALING_FACTOR;
  g.named(g.op('Conv', [pooled, g.f32(w, [4, 3, 1, 1])], { kernel_shape: [1, 1] }), 'latent_sample');
  g.output('latent_sample', 'float32', ['batch', 4, 'latent_height', 'latent_width']);
  return g.serialize();
}

export type { ElemType };
