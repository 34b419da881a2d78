import { GraphBuilder, type SerializedModel } from './onnx-builder.js';
import { BACKGROUND, BASE_RADIUS, DEFAULT_COLOUR, F, ORACLE_HIDDEN_SIZE, POSITION_STEP, wordFeatures } from './oracle-spec.js';
import { channels, noiseLevel, pixelSize, predictionFromX0, type Prediction, type TimestepInput } from './unet-pieces.js';

/**
 * ONNX graphs of the oracle model (see oracle-spec.ts for what it means). Its UNet is the
 * exact noise predictor for the prompt's target latent T:
 *
 *   eps(x_t, t) = (x_t - sqrt(abar_t) T) / sqrt(1 - abar_t)      (v-prediction: sqrt(abar) eps - sqrt(1 - abar) T)
 *
 * so every correct scheduler lands on T, up to what its schedule leaves by design. The
 * variants keep that meaning and make each of their extra inputs matter:
 *
 * - SDXL: the first text encoder knows only colours, the second only shapes and positions,
 *   and sizes reach the UNet only through the second's pooled text_embeds. Both encoders put
 *   the words in their penultimate hidden state and garbage in the others, and the UNet draws
 *   a white frame unless time_ids are (height, width, 0, 0, height, width) of the sample.
 * - LCM: the UNet reads w = guidance_scale - 1 back from timestep_cond and predicts the noise of
 *   the guided target T_u + (w + 1) (T - T_u), T_u being the empty prompt's: guidance inside.
 * - inpainting (9 channels): the target is T where the mask is 1 and the masked picture's
 *   latents where it is 0.
 */

export const VAE_SCALING_FACTOR = 0.18215;
export const SDXL_VAE_SCALING_FACTOR = 0.13025;
const TOKENS = 77;
const D = ORACLE_HIDDEN_SIZE;

/** Which feature slots each SDXL piece carries. */
const COLOUR_SLOTS = [F.r, F.g, F.b, F.colourCount];
const GEOMETRY_SLOTS = [F.circle, F.square, F.xSum, F.xCount, F.ySum, F.yCount];
const SIZE_SLOTS = [F.sizeSum, F.sizeCount];
/** What the SDXL oracle draws when time_ids are wrong: a white frame, which no test prompt asks for. */
const WRONG_TIME_IDS_LATENT = [1, 1, 1, 0];

export interface OracleUnetOptions {
  timestep: TimestepInput;
  prediction: Prediction;
  /** 4, or 9 for an inpainting UNet. */
  inChannels: 4 | 9;
  sdxl: boolean;
  /** An LCM UNet's timestep_cond width (even, at least 4). */
  guidanceEmbeddingDim?: number;
}

function slotMask(slots: number[]): Float32Array {
  const m = new Float32Array(D);
  for (const s of slots) m[s] = 1;
  return m;
}

function featureTable(vocab: Map<string, number>, slots?: number[]): Float32Array {
  const table = new Float32Array(vocab.size * D);
  const mask = slots ? slotMask(slots) : undefined;
  for (const [token, id] of vocab) {
    if (!token.endsWith('</w>')) continue;
    const f = wordFeatures(token.slice(0, -4));
    table.set(mask ? f.map((v, i) => v * mask[i]!) : f, id * D);
  }
  return table;
}

/** input_ids -> last_hidden_state: each token's row of a word-feature table. */
export function oracleTextEncoder(vocab: Map<string, number>, idsType: 'int32' | 'int64' = 'int32'): SerializedModel {
  const g = new GraphBuilder('oracle_text_encoder');
  const ids = g.input('input_ids', idsType, ['batch', TOKENS]);
  const hidden = g.op('Gather', [g.f32(featureTable(vocab), [vocab.size, D]), ids], { axis: 0 });
  g.named(hidden, 'last_hidden_state');
  g.named(g.op('ReduceSum', [hidden, g.i64([1])], { keepdims: 0 }), 'pooler_output');
  g.output('last_hidden_state', 'float32', ['batch', TOKENS, D]);
  g.output('pooler_output', 'float32', ['batch', D]);
  return g.serialize();
}

/**
 * An SDXL text encoder in optimum's layout: outputs (pooled first for the second encoder),
 * then hidden_states.0 .. hidden_states.2, the words in hidden_states.1 only.
 */
export function oracleTextEncoderXl(vocab: Map<string, number>, which: 1 | 2, idsType: 'int32' | 'int64' = 'int32'): SerializedModel {
  const g = new GraphBuilder(`oracle_text_encoder_${which}`);
  const ids = g.input('input_ids', idsType, ['batch', TOKENS]);
  const words = g.op('Gather', [g.f32(featureTable(vocab, which === 1 ? COLOUR_SLOTS : [...GEOMETRY_SLOTS, ...SIZE_SLOTS]), [vocab.size, D]), ids], {
    axis: 0,
  });
  const penultimate = which === 1 ? words : g.op('Mul', [words, g.f32(slotMask(GEOMETRY_SLOTS), [D])]);
  const last = g.op('Add', [g.op('Neg', [words]), g.scalar(0.25)]);
  const first = g.op('Add', [g.op('Mul', [words, g.scalar(0)]), g.scalar(0.25)]);
  const pooled = g.op('ReduceSum', [g.op('Mul', [words, g.f32(slotMask(which === 1 ? [] : SIZE_SLOTS), [D])]), g.i64([1])], { keepdims: 0 });
  const outputs: Array<[string, string, number[] | 'hidden']> =
    which === 1
      ? [
          ['last_hidden_state', last, 'hidden'],
          ['pooler_output', pooled, [D]],
        ]
      : [
          ['text_embeds', pooled, [D]],
          ['last_hidden_state', last, 'hidden'],
        ];
  outputs.push(['hidden_states.0', first, 'hidden'], ['hidden_states.1', penultimate, 'hidden'], ['hidden_states.2', last, 'hidden']);
  for (const [name, value, shape] of outputs) {
    g.named(value, name);
    g.output(name, 'float32', shape === 'hidden' ? ['batch', TOKENS, D] : ['batch', ...shape]);
  }
  return g.serialize();
}

/** (sample, timestep, encoder_hidden_states, [text_embeds, time_ids], [timestep_cond]) -> out_sample. */
export function oracleUnet(sigmas: Float64Array, o: OracleUnetOptions): SerializedModel {
  const g = new GraphBuilder('oracle_unet');
  const sample = g.input('sample', 'float32', ['batch', o.inChannels, 'height', 'width']);
  const tIn = g.input('timestep', o.timestep.type, o.timestep.rank === 1 ? [1] : []);
  const ehs = g.input('encoder_hidden_states', 'float32', ['batch', TOKENS, o.sdxl ? 2 * D : D]);
  const sumTokens = (x: string) => g.op('ReduceSum', [x, g.i64([1])], { keepdims: 0 });

  let feats: string;
  let timeIds: string | undefined;
  if (o.sdxl) {
    const textEmbeds = g.input('text_embeds', 'float32', ['batch', D]);
    timeIds = g.input('time_ids', 'float32', ['batch', 6]);
    const part = (from: number, slots: number[]) =>
      g.op('Mul', [sumTokens(g.op('Slice', [ehs, g.i64([from]), g.i64([from + D]), g.i64([2])])), g.f32(slotMask(slots), [D])]);
    feats = g.op('Add', [g.op('Add', [part(0, COLOUR_SLOTS), part(D, GEOMETRY_SLOTS)]), g.op('Mul', [textEmbeds, g.f32(slotMask(SIZE_SLOTS), [D])])]);
  } else {
    feats = sumTokens(ehs);
  }
  let target = targetLatent(g, feats, sample);

  if (o.guidanceEmbeddingDim) {
    // w from the lowest frequency: sin and cos of 0.1 w (1000 w times exp(-ln 10000)); |0.1 w| < pi/2.
    const half = o.guidanceEmbeddingDim / 2;
    const cond = g.input('timestep_cond', 'float32', ['batch', o.guidanceEmbeddingDim]);
    const at = (k: number) => g.op('Gather', [cond, g.i64([k])], { axis: 1 });
    const w = g.op('Mul', [g.op('Atan', [g.op('Div', [at(half - 1), at(2 * half - 1)])]), g.scalar(10)]);
    const scale = g.op('Reshape', [g.op('Add', [w, g.scalar(1)]), g.i64([-1, 1, 1, 1])]);
    const bg4 = g.f32([...BACKGROUND, 0], [1, 4, 1, 1]);
    target = g.op('Add', [bg4, g.op('Mul', [scale, g.op('Sub', [target, bg4])])]);
  }
  if (timeIds) {
    const { height, width } = pixelSize(g, sample);
    const zero = g.op('Mul', [height, g.scalar(0)]);
    const expected = g.op('Concat', [height, width, zero, zero, height, width], { axis: 1 });
    const valid = g.op('ReduceMin', [g.op('Cast', [g.op('Equal', [timeIds, expected])], { to: 1 })], { axes: [1], keepdims: 1 });
    const valid4 = g.op('Reshape', [valid, g.i64([-1, 1, 1, 1])]);
    const wrong = g.f32(WRONG_TIME_IDS_LATENT, [1, 4, 1, 1]);
    target = g.op('Add', [wrong, g.op('Mul', [valid4, g.op('Sub', [target, wrong])])]);
  }
  let xt = sample;
  if (o.inChannels === 9) {
    xt = channels(g, sample, 0, 4);
    const mask = channels(g, sample, 4, 5);
    const masked = channels(g, sample, 5, 9);
    target = g.op('Add', [masked, g.op('Mul', [mask, g.op('Sub', [target, masked])])]);
  }
  g.named(predictionFromX0(g, xt, target, noiseLevel(g, tIn, sigmas), o.prediction), 'out_sample');
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
export function oracleVaeDecoder(scalingFactor = VAE_SCALING_FACTOR): SerializedModel {
  const g = new GraphBuilder('oracle_vae_decoder');
  const z = g.input('latent_sample', 'float32', ['batch', 4, 'latent_height', 'latent_width']);
  const w = new Float32Array(3 * 4);
  for (let c = 0; c < 3; c++) w[c * 4 + c] = scalingFactor;
  const rgb = g.op('Conv', [z, g.f32(w, [3, 4, 1, 1])], { kernel_shape: [1, 1] });
  const up = g.op('Resize', [rgb, '', g.f32([1, 1, 8, 8], [4])], { mode: 'nearest', nearest_mode: 'floor', coordinate_transformation_mode: 'asymmetric' });
  g.named(up, 'sample');
  g.output('sample', 'float32', ['batch', 3, 'height', 'width']);
  return g.serialize();
}

/** sample [B,3,H,W] -> latent_sample [B,4,H/8,W/8]: the decoder's inverse on 8x8 block means. */
export function oracleVaeEncoder(scalingFactor = VAE_SCALING_FACTOR): SerializedModel {
  const g = new GraphBuilder('oracle_vae_encoder');
  const x = g.input('sample', 'float32', ['batch', 3, 'height', 'width']);
  const pooled = g.op('AveragePool', [x], { kernel_shape: [8, 8], strides: [8, 8] });
  const w = new Float32Array(4 * 3);
  for (let c = 0; c < 3; c++) w[c * 3 + c] = 1 / scalingFactor;
  g.named(g.op('Conv', [pooled, g.f32(w, [4, 3, 1, 1])], { kernel_shape: [1, 1] }), 'latent_sample');
  g.output('latent_sample', 'float32', ['batch', 4, 'latent_height', 'latent_width']);
  return g.serialize();
}

export type { TimestepInput };
