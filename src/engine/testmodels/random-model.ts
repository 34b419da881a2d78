import { NumpyRandomState } from '../random.js';
import { GraphBuilder, type ElemType, type SerializedModel } from './onnx-builder.js';
import type { TimestepInput } from './oracle.js';

/**
 * Random-weight models with Stable Diffusion's ONNX signature (input and output names,
 * ranks and dtypes), at sizes chosen by the caller. They make no sensible pictures; they exist
 * to test determinism, dtype handling and to measure the engine's overhead on real compute.
 */

export interface RandomModelOptions {
  vocabSize: number;
  /** Width of the text encoder's hidden states (768 in SD 1.x, 1024 in SD 2.x). */
  hiddenSize: number;
  /** Channels inside the UNet; compute grows with channels^2 x blocks. */
  unetChannels: number;
  unetBlocks: number;
  vaeChannels: number;
  idsType: 'int32' | 'int64';
  timestep: TimestepInput;
  /** Inputs and outputs in float16 (as fp16 exports have). */
  fp16: boolean;
  /** Store large weights in `model.onnx_data` next to each model.onnx. */
  externalData: boolean;
  seed: number;
}

export const DEFAULT_RANDOM_MODEL: RandomModelOptions = {
  vocabSize: 0,
  hiddenSize: 64,
  unetChannels: 32,
  unetBlocks: 2,
  vaeChannels: 8,
  idsType: 'int32',
  timestep: { type: 'int64', rank: 1 },
  fp16: false,
  externalData: false,
  seed: 0,
};

const TOKENS = 77;
const EXTERNAL = 'model.onnx_data';

class Weights {
  private readonly rng: NumpyRandomState;
  constructor(seed: number) {
    this.rng = new NumpyRandomState(seed);
  }
  /** Normal weights scaled by 1/sqrt(fanIn) so activations stay of order one. */
  normal(count: number, fanIn: number): Float32Array {
    const w = this.rng.randn(count);
    const k = 1 / Math.sqrt(fanIn);
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

export function randomTextEncoder(o: RandomModelOptions): SerializedModel {
  const w = new Weights(o.seed + 1);
  const g = new GraphBuilder('random_text_encoder');
  const ids = g.input('input_ids', o.idsType, ['batch', TOKENS]);
  const D = o.hiddenSize;
  const tok = g.op('Gather', [g.f32(w.normal(o.vocabSize * D, 1), [o.vocabSize, D]), ids], { axis: 0 });
  const x = g.op('Add', [tok, g.f32(w.normal(TOKENS * D, 1), [1, TOKENS, D])]);
  const h = g.op('Tanh', [g.op('MatMul', [x, g.f32(w.normal(D * D, D), [D, D])])]);
  floatOut(g, h, 'last_hidden_state', o.fp16, ['batch', TOKENS, D]);
  floatOut(g, g.op('ReduceMean', [h], { axes: [1], keepdims: 0 }), 'pooler_output', o.fp16, ['batch', D]);
  return serialize(g, o);
}

export function randomUnet(o: RandomModelOptions): SerializedModel {
  const w = new Weights(o.seed + 2);
  const g = new GraphBuilder('random_unet');
  const C = o.unetChannels;
  const D = o.hiddenSize;
  const sample = floatIn(g, 'sample', o.fp16, ['batch', 4, 'height', 'width']);
  const t = g.input('timestep', o.timestep.type, o.timestep.rank === 1 ? [1] : []);
  const ehs = floatIn(g, 'encoder_hidden_states', o.fp16, ['batch', TOKENS, D]);

  const conv = (x: string, cin: number, cout: number) =>
    g.op('Conv', [x, g.f32(w.normal(cout * cin * 9, cin * 9), [cout, cin, 3, 3]), g.f32(new Float32Array(cout), [cout])], {
      kernel_shape: [3, 3],
      pads: [1, 1, 1, 1],
    });

  let x = conv(sample, 4, C);
  // Sinusoidal timestep embedding, broadcast over the batch and the image.
  const tf = g.op('Reshape', [g.op('Cast', [t], { to: 1 }), g.i64([-1, 1])]);
  const freqs = Float32Array.from({ length: C }, (_, i) => Math.exp((-Math.log(10000) * i) / C));
  const temb = g.op('Reshape', [g.op('Sin', [g.op('Mul', [tf, g.f32(freqs, [1, C])])]), g.i64([-1, C, 1, 1])]);
  x = g.op('Add', [x, temb]);

  const shape = g.op('Shape', [x]);
  const k = g.op('MatMul', [ehs, g.f32(w.normal(D * C, D), [D, C])]); // [B, 77, C]
  const v = g.op('MatMul', [ehs, g.f32(w.normal(D * C, D), [D, C])]);
  const kT = g.op('Transpose', [k], { perm: [0, 2, 1] });
  for (let b = 0; b < o.unetBlocks; b++) {
    x = g.op('Add', [x, g.op('Tanh', [conv(x, C, C)])]);
    // Cross-attention of every latent pixel over the 77 text tokens.
    const q = g.op('Transpose', [g.op('Reshape', [x, g.i64([0, C, -1])])], { perm: [0, 2, 1] }); // [B, hw, C]
    const scores = g.op('Mul', [g.op('MatMul', [q, kT]), g.scalar(1 / Math.sqrt(C))]);
    const att = g.op('MatMul', [g.op('Softmax', [scores], { axis: -1 }), v]); // [B, hw, C]
    x = g.op('Add', [x, g.op('Reshape', [g.op('Transpose', [att], { perm: [0, 2, 1] }), shape])]);
  }
  floatOut(g, conv(x, C, 4), 'out_sample', o.fp16, ['batch', 4, 'height', 'width']);
  return serialize(g, o);
}

export function randomVaeDecoder(o: RandomModelOptions): SerializedModel {
  const w = new Weights(o.seed + 3);
  const g = new GraphBuilder('random_vae_decoder');
  const C = o.vaeChannels;
  const z = floatIn(g, 'latent_sample', o.fp16, ['batch', 4, 'latent_height', 'latent_width']);
  const h = g.op('Conv', [z, g.f32(w.normal(C * 4, 4), [C, 4, 1, 1])], { kernel_shape: [1, 1] });
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
  const z = g.op('Conv', [pooled, g.f32(w.normal(4 * 3, 3), [4, 3, 1, 1])], { kernel_shape: [1, 1] });
  floatOut(g, z, 'latent_sample', o.fp16, ['batch', 4, 'latent_height', 'latent_width']);
  return serialize(g, o);
}
