import type { LoadedModel } from './model.js';
import { floatTensor } from './onnx/runtime.js';

/**
 * The VAE at both ends of a generation: images in [-1, 1] to scaled latents (image inputs) and
 * latents back to RGB bytes. Arithmetic is rounded to float32 where numpy works in float32,
 * so the bytes match the reference pipelines'.
 */

/**
 * How the reference divides latents by the scaling factor before decoding: diffusers' ONNX SD
 * pipelines write `1 / 0.18215 * latents` (the reciprocal, rounded to float32, times each value);
 * optimum's SDXL and LCM pipelines `latents /= scaling_factor`.
 */
export type Unscale = 'reciprocal' | 'divide';

/** latents [4, h, w] -> HWC RGB bytes: decode(latents / factor), clip(x / 2 + 0.5), round(x * 255) half to even. */
export async function decodeLatents(model: LoadedModel, latents: Float32Array, h: number, w: number, unscale: Unscale): Promise<Uint8Array> {
  const f = Math.fround;
  const vae = model.vaeDecoder;
  const factor = f(model.vaeScalingFactor);
  const inverse = f(1 / model.vaeScalingFactor);
  const scaled = unscale === 'reciprocal' ? latents.map((v) => inverse * v) : latents.map((v) => v / factor);
  const outName = vae.outputs.has('sample') ? 'sample' : [...vae.outputs.keys()][0]!;
  const img = (await vae.run({ latent_sample: floatTensor(vae.input('latent_sample'), scaled, [1, 4, h, w]) }, [outName]))[outName]!;
  const H = h * 8;
  const W = w * 8;
  if (img.length !== 3 * H * W) throw new Error(`${vae.file}: decoded ${img.length} values; expected 3 x ${H} x ${W}`);
  checkFinite(model, img);
  return toBytes(img, H * W);
}

/** CHW float [-1, 1] -> HWC bytes, in float32 as numpy: clip(x / 2 + 0.5, 0, 1), (x * 255).round(). */
export function toBytes(img: Float32Array, plane: number): Uint8Array {
  const f = Math.fround;
  const rgb = new Uint8Array(plane * 3);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < plane; i++) {
      const v = Math.min(1, Math.max(0, f(img[c * plane + i]! / 2 + 0.5)));
      rgb[i * 3 + c] = roundHalfEven(f(v * 255));
    }
  }
  return rgb;
}

/**
 * A float16 VAE whose activations pass 65,504 turns them into infinities and its output into
 * NaN (SDXL's VAE does this on most images): say so instead of saving a black picture.
 */
function checkFinite(model: LoadedModel, img: Float32Array): void {
  let bad = 0;
  for (let i = 0; i < img.length; i++) if (!Number.isFinite(img[i]!)) bad++;
  if (bad === 0) return;
  const vae = model.vaeDecoder;
  const half = vae.input('latent_sample').type === 'float16' || [...vae.outputs.values()].some((o) => o.type === 'float16');
  const why = half
    ? `it runs in half precision and overflowed (float16 ends at 65,504). Use a float32 export of the VAE${model.variant.family === 'sdxl' ? ', or the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix)' : ''}`
    : 'the model or the latents are broken';
  throw new Error(`${vae.file}: the VAE decoder returned ${bad} NaN or infinite values of ${img.length}: ${why}`);
}

/**
 * image CHW in [-1, 1] -> latents [4, h, w] times the scaling factor (float32, as numpy). An
 * export whose encoder returns the distribution's parameters (`latent_parameters`: mean and
 * log-variance) gives its mean; diffusers would draw a sample with torch's generator there.
 */
export async function encodeImage(model: LoadedModel, image: Float32Array, height: number, width: number): Promise<Float32Array> {
  const vae = await model.vaeEncoder();
  const outName = vae.outputs.has('latent_sample') ? 'latent_sample' : [...vae.outputs.keys()][0]!;
  const out = (await vae.run({ sample: floatTensor(vae.input('sample'), image, [1, 3, height, width]) }, [outName]))[outName]!;
  const n = 4 * (height / 8) * (width / 8);
  if (out.length !== n && out.length !== 2 * n) throw new Error(`${vae.file}: encoded ${out.length} values; expected 4 (or 8) x ${height / 8} x ${width / 8}`);
  const factor = Math.fround(model.vaeScalingFactor);
  return out.subarray(0, n).map((v) => v * factor);
}

/** numpy's round(): halves go to the even neighbour. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}
