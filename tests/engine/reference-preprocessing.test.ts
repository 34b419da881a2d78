import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { inpaintingInputs, keepMask, luma, toModelInput, type RgbImage } from '../../src/engine/input-images.js';
import { guidanceEmbedding } from '../../src/engine/unet.js';
import { toBytes } from '../../src/engine/vae.js';

/**
 * The arrays the reference pipelines build around the models, against numbers made with
 * Pillow 9.4 and numpy 1.24 (the numpy of optimum's numpy-era pipelines) by running, on the
 * pictures below: diffusers' prepare_mask_and_masked_image (ONNX inpaint), preprocess_mask (ONNX
 * legacy inpaint), the ONNX img2img and inpaint pixel scalings on every byte value,
 * VaeImageProcessor's postprocess, and optimum's get_guidance_scale_embedding.
 */

interface Reference {
  luma: number[];
  inpaintMask: number[];
  maskedImage: number[];
  keepMask: number[];
  over255: number[];
  over127_5: number[];
  decoded: number[];
  bytes: number[];
  embedding: Record<string, number[]>;
  versions: { PIL: string; numpy: string };
}

const ref = JSON.parse(readFileSync(path.join(import.meta.dirname, 'fixtures', 'preprocessing-reference.json'), 'utf8')) as Reference;
const W = 32;
const H = 32;

/** The fixture's picture and mask: colour ramps, and greys and colours around the mask threshold. */
function pictures(): { image: RgbImage; mask: RgbImage } {
  const image = new Uint8Array(W * H * 3);
  const mask = new Uint8Array(W * H * 3);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const i = (y * W + x) * 3;
      image.set([(x * 37 + y * 11) % 256, (x * 5 + y * 53) % 256, (x * x + y) % 256], i);
      const v = (x * 8 + y * 3) % 256;
      mask.set((x + y) % 3 ? [v, (v * 7 + 3) % 256, 255 - v] : [v, v, v], i);
    }
  }
  return { image: { width: W, height: H, rgb: image }, mask: { width: W, height: H, rgb: mask } };
}

/** Equal value for value, -0 and 0 alike (numpy's 0 * -1 is -0). */
function expectSame(actual: ArrayLike<number>, expected: number[]): void {
  expect(actual.length).toBe(expected.length);
  const differing = expected.flatMap((v, i) => (actual[i] === v || (actual[i] === 0 && v === 0) ? [] : [i]));
  expect(differing).toEqual([]);
}

describe(`preprocessing as diffusers builds it (Pillow ${ref.versions.PIL}, numpy ${ref.versions.numpy})`, () => {
  const { image, mask } = pictures();

  it('the mask as PIL converts it to L', () => {
    expectSame(luma(mask), ref.luma);
  });

  it('9-channel inpainting: the latent mask (nearest pick, binarised) and the masked picture', () => {
    const inputs = inpaintingInputs(image, luma(mask));
    expectSame(inputs.mask, ref.inpaintMask);
    expectSame(inputs.maskedImage, ref.maskedImage);
  });

  it('legacy inpainting: the keep mask, 1 - mask / 255 on four channels', () => {
    expectSame(keepMask(luma(mask), W, H), ref.keepMask);
  });

  it('pixel scalings of img2img (2 x / 255 - 1) and inpaint (x / 127.5 - 1), every byte value', () => {
    const bytes: RgbImage = { width: 256, height: 1, rgb: Uint8Array.from({ length: 768 }, (_, i) => Math.floor(i / 3)) };
    expectSame(toModelInput(bytes, 'over255').subarray(0, 256), ref.over255);
    expectSame(toModelInput(bytes, 'over127.5').subarray(0, 256), ref.over127_5);
  });

  it('decoded pixels to bytes: clip(x / 2 + 0.5), x * 255 rounded half to even, in float32', () => {
    const n = ref.decoded.length;
    const chw = new Float32Array(3 * n);
    chw.set(ref.decoded);
    const rgb = toBytes(chw, n);
    expectSame(
      Array.from({ length: n }, (_, i) => rgb[i * 3]!),
      ref.bytes,
    );
  });

  it("LCM's guidance embedding, to within numpy's float32 exp, sin and cos", () => {
    // numpy's SIMD float32 kernels are not correctly rounded (exp is off by up to 2.5 ulp); an
    // argument of 1000 w times a frequency turns that into up to 5e-4 at w = 7.5.
    for (const [key, expected] of Object.entries(ref.embedding)) {
      const [g, dim] = key.split('/').map(Number) as [number, number];
      const mine = guidanceEmbedding(g, dim);
      expect(mine.length).toBe(expected.length);
      const worst = expected.reduce((m, v, i) => Math.max(m, Math.abs(v - mine[i]!)), 0);
      expect(worst, key).toBeLessThan(g === 1 ? 1e-12 : 1e-3);
    }
  });
});
