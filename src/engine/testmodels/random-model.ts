import { NumpyRandomState } from '../random.js';
import { GraphBuilder, type ElemType, type SerializedModel } from './onnx-builder.js';
import { channels, noiseLevel, type Prediction, type TimestepInput } from './unet-pieces.js';

/**
 * Random-weight models with the ONNX signatures of Stable Diffusion's variants (input and output
 * names, ranks and dtypes), at sizes chosen by the caller. They draw no sensible pictures; they
 * test determinism, dtype handling and each export variant, and measure the engine's overhead
 * on real compute.
 *
 * They are scaled like real models, so that an image comparison on them says something: the
 * UNet is the exact denoiser of a data distribution N(g, I) whose centre g (in [-1, 1]) a random
 * network computes from the sample, the timestep and the text; its noise prediction
 * sqrt(1 - abar) (x_t - sqrt(abar) g) and the latents it leads to are of order 1, as a real
 * UNet's are, and the VAE decodes such latents to mostly unclipped pixels.
 */

export interface RandomModelOptions {
  vocabSize: number;
  /** Width of the (first) text encoder's hidden states (768 in SD 1.x, 1024 in SD 2.x). */
  hiddenSize: number;
  /** Channels inside the UNet (at its first level); compute grows with channels^2 x blocks. */
  unetChannels: number;
  unetBlocks: number;
  /**
   * Resolution levels, as SD's UNet has four (latents 64, 32, 16 and 8 wide at 512x512, with
   * 1, 2, 4 and 4 times the channels): each level below the first halves the side and multiplies
   * the channels the same way, runs its blocks on the way down and, but for the last, on the way
   * up, joined by skip connections. 1: every block at the latents' own size.
   */
  unetLevels: number;
  vaeChannels: number;
  idsType: 'int32' | 'int64';
  timestep: TimestepInput;
  /** Inputs and outputs in float16 (as fp16 exports have). */
  fp16: boolean;
  /** Store large weights in `model.onnx_data` next to each model.onnx. */
  externalData: boolean;
  seed: number;
  prediction: Prediction;
  /** 4, or 9 for an inpainting UNet (latents, mask, masked-image latents). */
  inChannels: 4 | 9;
  /** SDXL: the second text encoder's hidden size and its pooled (text_embeds) width. */
  sdxl: { hiddenSize2: number; pooledSize: number } | null;
  /** LCM: the width of the UNet's timestep_cond (guidance embedding). */
  guidanceEmbeddingDim: number | null;
  /** The VAE's scaling factor (written to vae_decoder/config.json for SDXL). */
  vaeScalingFactor: number;
  /** A float16 VAE decoder whose activations overflow, as SDXL's does in half precision. */
  vaeOverflow: boolean;
}

export const DEFAULT_RANDOM_MODEL: RandomModelOptions = {
  vocabSize: 0,
  hiddenSize: 64,
  unetChannels: 32,
  unetBlocks: 2,
  unetLevels: 1,
  vaeChannels: 8,
  idsType: 'int32',
  timestep: { type: 'int64', rank: 1 },
  fp16: false,
  externalData: false,
  seed: 0,
  prediction: 'epsilon',
  inChannels: 4,
  sdxl: null,
  guidanceEmbeddingDim: null,
  vaeScalingFactor: 0.18215,
  vaeOverflow: false,
};

const TOKENS = 77;
const EXTERNAL = 'model.onnx_data';
/** How strongly the text moves the UNet's estimate: real guidance changes it by tenths, not wholes. */
const TEXT_GAIN = 0.15;

class Weights {
  private readonly rng: NumpyRandomState;
  constructor(seed: number) {
    this.rng = new NumpyRandomState(seed);
  }
  /** Normal weights scaled by gain/sqrt(fanIn) so activations stay of order `gain`. */
  normal(count: number, fanIn: number, gain = 1): Float32Array {
    const w = this.rng.randn(count);
    const k = gain / Math.sqrt(fanIn);
    for (let i = 0; i < count; i++) w[i]! *= k;
    return w;
  }
}

function floatIn(g: GraphBuilder, name: string, fp16: boolean, shape: (number | string)[]): string {
  const v = g.input(name, fp16 ? 'float16' : 'float32', shape);
  return fp16 ? g.op('Cast', [v], { to: 1 }) : v;
}

function floatOut(g: GraphBuilder, value: string, name: string, fp16: boolean, shape: (number | string)[]): void {
  g.named(fp16 ? g.op('Cast', [value], { to: 10 }) : value, name);
  g.output(name, (fp16 ? 'float16' : 'float32') satisfies ElemType, shape);
}

function serialize(g: GraphBuilder, o: RandomModelOptions): SerializedModel {
  return g.serialize(o.externalData ? { externalDataFile: EXTERNAL } : {});
}

/** Token and position embeddings through two tanh layers: [x, h1, h2] per token. */
function textLayers(g: GraphBuilder, w: Weights, o: RandomModelOptions, width: number): string[] {
  const ids = g.input('input_ids', o.idsType, ['batch', TOKENS]);
  const tok = g.op('Gather', [g.f32(w.normal(o.vocabSize * width, 1), [o.vocabSize, width]), ids], { axis: 0 });
  const x = g.op('Add', [tok, g.f32(w.normal(TOKENS * width, 1), [1, TOKENS, width])]);
  const layer = (h: string) => g.op('Tanh', [g.op('MatMul', [h, g.f32(w.normal(width * width, width), [width, width])])]);
  const h1 = layer(x);
  return [x, h1, layer(h1)];
}

/** SD's text encoder: last_hidden_state and pooler_output. */
export function randomTextEncoder(o: RandomModelOptions): SerializedModel {
  const g = new GraphBuilder('random_text_encoder');
  const D = o.hiddenSize;
  const last = textLayers(g, new Weights(o.seed + 1), o, D)[2]!;
  floatOut(g, last, 'last_hidden_state', o.fp16, ['batch', TOKENS, D]);
  floatOut(g, g.op('ReduceMean', [last], { axes: [1], keepdims: 0 }), 'pooler_output', o.fp16, ['batch', D]);
  return serialize(g, o);
}

/** An SDXL text encoder in optimum's layout, hidden_states.0..2 last (see oracle.ts). */
export function randomTextEncoderXl(o: RandomModelOptions, which: 1 | 2): SerializedModel {
  const xl = o.sdxl!;
  const w = new Weights(o.seed + (which === 1 ? 1 : 5));
  const g = new GraphBuilder(`random_text_encoder_${which}`);
  const D = which === 1 ? o.hiddenSize : xl.hiddenSize2;
  const layers = textLayers(g, w, o, D);
  const last = layers[2]!;
  const mean = g.op('ReduceMean', [last], { axes: [1], keepdims: 0 });
  const hidden = ['batch', TOKENS, D];
  if (which === 1) {
    floatOut(g, last, 'last_hidden_state', o.fp16, hidden);
    floatOut(g, mean, 'pooler_output', o.fp16, ['batch', D]);
  } else {
    const P = xl.pooledSize;
    floatOut(g, g.op('MatMul', [mean, g.f32(w.normal(D * P, D), [D, P])]), 'text_embeds', o.fp16, ['batch', P]);
    floatOut(g, last, 'last_hidden_state', o.fp16, hidden);
  }
  layers.forEach((h, i) => floatOut(g, h, `hidden_states.${i}`, o.fp16, hidden));
  return serialize(g, o);
}

export function randomUnet(o: RandomModelOptions, sigmas: Float64Array): SerializedModel {
  const w = new Weights(o.seed + 2);
  const g = new GraphBuilder('random_unet');
  const C = o.unetChannels;
  const D = o.hiddenSize + (o.sdxl?.hiddenSize2 ?? 0);
  const sample = floatIn(g, 'sample', o.fp16, ['batch', o.inChannels, 'height', 'width']);
  const t = g.input('timestep', o.timestep.type, o.timestep.rank === 1 ? [1] : []);
  const ehs = floatIn(g, 'encoder_hidden_states', o.fp16, ['batch', TOKENS, D]);
  const perChannel = (v: string) => g.op('Reshape', [v, g.i64([-1, C, 1, 1])]);
  const linear = (v: string, from: number) => g.op('MatMul', [v, g.f32(w.normal(from * C, from), [from, C])]);

  const conv = (x: string, cin: number, cout: number) =>
    g.op('Conv', [x, g.f32(w.normal(cout * cin * 9, cin * 9), [cout, cin, 3, 3]), g.f32(new Float32Array(cout), [cout])], {
      kernel_shape: [3, 3],
      pads: [1, 1, 1, 1],
    });

  let x = conv(sample, o.inChannels, C);
  // Sinusoidal timestep embedding, broadcast over the batch and the image.
  const tf = g.op('Reshape', [g.op('Cast', [t], { to: 1 }), g.i64([-1, 1])]);
  const freqs = Float32Array.from({ length: C }, (_, i) => Math.exp((-Math.log(10000) * i) / C));
  x = g.op('Add', [x, perChannel(g.op('Sin', [g.op('Mul', [tf, g.f32(freqs, [1, C])])]))]);
  if (o.sdxl) {
    // SDXL's added conditioning: the pooled text and the size/crop ids (sinusoids of pixels).
    const textEmbeds = floatIn(g, 'text_embeds', o.fp16, ['batch', o.sdxl.pooledSize]);
    const timeIds = floatIn(g, 'time_ids', o.fp16, ['batch', 6]);
    const ids = g.op('Sin', [g.op('Mul', [linear(timeIds, 6), g.scalar(0.01)])]);
    x = g.op('Add', [x, perChannel(g.op('Add', [g.op('Mul', [g.op('Tanh', [linear(textEmbeds, o.sdxl.pooledSize)]), g.scalar(TEXT_GAIN)]), ids]))]);
  }
  if (o.guidanceEmbeddingDim) {
    const cond = floatIn(g, 'timestep_cond', o.fp16, ['batch', o.guidanceEmbeddingDim]);
    x = g.op('Add', [x, perChannel(g.op('Tanh', [linear(cond, o.guidanceEmbeddingDim)]))]);
  }

  /** `unetBlocks` blocks of C channels: a residual convolution, then cross-attention of every pixel over the 77 text tokens. */
  const blocks = (input: string, C: number) => {
    let h = input;
    const shape = g.op('Shape', [h]);
    const k = g.op('MatMul', [ehs, g.f32(w.normal(D * C, D), [D, C])]); // [B, 77, C]
    const v = g.op('MatMul', [ehs, g.f32(w.normal(D * C, D, TEXT_GAIN), [D, C])]);
    const kT = g.op('Transpose', [k], { perm: [0, 2, 1] });
    for (let b = 0; b < o.unetBlocks; b++) {
      h = g.op('Add', [h, g.op('Tanh', [conv(h, C, C)])]);
      const q = g.op('Transpose', [g.op('Reshape', [h, g.i64([0, C, -1])])], { perm: [0, 2, 1] }); // [B, hw, C]
      const scores = g.op('Mul', [g.op('MatMul', [q, kT]), g.scalar(1 / Math.sqrt(C))]);
      const att = g.op('MatMul', [g.op('Softmax', [scores], { axis: -1 }), v]); // [B, hw, C]
      h = g.op('Add', [h, g.op('Reshape', [g.op('Transpose', [att], { perm: [0, 2, 1] }), shape])]);
    }
    return h;
  };
  const pointwise = (h: string, cin: number, cout: number) => g.op('Conv', [h, g.f32(w.normal(cout * cin, cin), [cout, cin, 1, 1])], { kernel_shape: [1, 1] });
  const width = (level: number) => C * [1, 2, 4, 4][Math.min(level, 3)]!;
  const skips: string[] = [];
  for (let level = 0; level < o.unetLevels; level++) {
    if (level > 0) x = pointwise(g.op('AveragePool', [x], { kernel_shape: [2, 2], strides: [2, 2] }), width(level - 1), width(level));
    x = blocks(x, width(level));
    skips.push(x);
  }
  for (let level = o.unetLevels - 2; level >= 0; level--) {
    const up = g.op('Resize', [x, '', g.f32([1, 1, 2, 2], [4])], { mode: 'nearest' });
    x = blocks(g.op('Add', [pointwise(up, width(level + 1), width(level)), skips[level]!]), width(level));
  }
  // The denoiser of N(centre, I): eps = s (x_t - a centre); its clean estimate a x_t + s^2 centre.
  const centre = g.op('Tanh', [conv(x, C, 4)]);
  const xt = o.inChannels === 9 ? channels(g, sample, 0, 4) : sample;
  const { a, s } = noiseLevel(g, t, sigmas);
  let out = g.op('Mul', [s, g.op('Sub', [xt, g.op('Mul', [a, centre])])]);
  if (o.prediction === 'v_prediction') {
    const x0 = g.op('Add', [g.op('Mul', [a, xt]), g.op('Mul', [g.op('Mul', [s, s]), centre])]);
    out = g.op('Sub', [g.op('Mul', [a, out]), g.op('Mul', [s, x0])]);
  }
  floatOut(g, out, 'out_sample', o.fp16, ['batch', 4, 'height', 'width']);
  return serialize(g, o);
}

export function randomVaeDecoder(o: RandomModelOptions): SerializedModel {
  const w = new Weights(o.seed + 3);
  const g = new GraphBuilder('random_vae_decoder');
  const C = o.vaeChannels;
  const z = floatIn(g, 'latent_sample', o.fp16, ['batch', 4, 'latent_height', 'latent_width']);
  // The pipeline divides latents by the scaling factor; the first layer multiplies it back.
  let h = g.op('Tanh', [g.op('Conv', [z, g.f32(w.normal(C * 4, 4, o.vaeScalingFactor), [C, 4, 1, 1])], { kernel_shape: [1, 1] })]);
  if (o.vaeOverflow) {
    // Activations past float16's 65,504 become infinities; the normalisation after them, NaN.
    const big = g.op('Mul', [g.op('Cast', [z], { to: 10 }), g.op('Cast', [g.scalar(1e5)], { to: 10 })]);
    const normed = g.op('Div', [big, g.op('ReduceMax', [g.op('Abs', [big])], { keepdims: 1 })]);
    h = g.op('Add', [h, g.op('ReduceMean', [g.op('Cast', [normed], { to: 1 })], { axes: [1], keepdims: 1 })]);
  }
  const up = g.op('Resize', [h, '', g.f32([1, 1, 8, 8], [4])], { mode: 'nearest' });
  const rgb = g.op('Conv', [up, g.f32(w.normal(3 * C * 9, C * 9), [3, C, 3, 3])], { kernel_shape: [3, 3], pads: [1, 1, 1, 1] });
  floatOut(g, g.op('Tanh', [rgb]), 'sample', o.fp16, ['batch', 3, 'height', 'width']);
  return serialize(g, o);
}

export function randomVaeEncoder(o: RandomModelOptions): SerializedModel {
  const w = new Weights(o.seed + 4);
  const g = new GraphBuilder('random_vae_encoder');
  const x = floatIn(g, 'sample', o.fp16, ['batch', 3, 'height', 'width']);
  const pooled = g.op('AveragePool', [x], { kernel_shape: [8, 8], strides: [8, 8] });
  // Latents of order 1 once the pipeline multiplies them by the scaling factor.
  const z = g.op('Conv', [pooled, g.f32(w.normal(4 * 3, 3, 1 / o.vaeScalingFactor), [4, 3, 1, 1])], { kernel_shape: [1, 1] });
  floatOut(g, z, 'latent_sample', o.fp16, ['batch', 4, 'latent_height', 'latent_width']);
  return serialize(g, o);
}
