import sharp, { type OutputInfo } from 'sharp';
import { GENERATION_LIMITS, invalid } from './params.js';

/**
 * Input pictures for image-to-image and inpainting: encoded files (PNG, JPEG, WebP) decoded
 * with sharp, checked against the request, and turned into the arrays diffusers' ONNX
 * pipelines build with PIL and numpy.
 */

export interface RgbImage {
  width: number;
  height: number;
  /** HWC, 8 bits per channel. */
  rgb: Uint8Array;
}

const MAX_PIXELS = GENERATION_LIMITS.maxSide * GENERATION_LIMITS.maxSide;

/**
 * Decodes `bytes` to 8-bit RGB. Like diffusers' load_image: EXIF orientation applied, alpha
 * dropped (PIL's convert("RGB") drops it too), greyscale and palettes expanded.
 */
export async function decodeImage(bytes: Uint8Array, param: 'image' | 'mask'): Promise<RgbImage> {
  if (!(bytes instanceof Uint8Array) || bytes.length === 0) invalid(`\`${param}\` has to be the bytes of a PNG, JPEG or WebP file`);
  let decoded: { data: Buffer; info: OutputInfo };
  try {
    decoded = await sharp(bytes, { limitInputPixels: MAX_PIXELS, failOn: 'error' })
      .rotate()
      .removeAlpha()
      .toColourspace('srgb')
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
  } catch (err) {
    invalid(`\`${param}\` is not a PNG, JPEG or WebP image we can read, or is over ${MAX_PIXELS} pixels (${(err as Error).message})`);
  }
  const { data, info } = decoded;
  if (info.channels !== 3) invalid(`\`${param}\` decoded to ${info.channels} channels; expected RGB`);
  return { width: info.width, height: info.height, rgb: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

export function checkSize(img: RgbImage, param: 'image' | 'mask', width: number, height: number, against: string): void {
  if (img.width !== width || img.height !== height) {
    invalid(`\`${param}\` is ${img.width}x${img.height} pixels but ${against} ${width}x${height}; they have to match`);
  }
}

/**
 * HWC bytes -> CHW float32 in [-1, 1], with the reference's rounding: `2 * (x / 255) - 1`
 * (diffusers' ONNX img2img and legacy inpaint preprocess, optimum's VaeImageProcessor) or
 * `x / 127.5 - 1` (diffusers' ONNX inpaint pipeline).
 */
export function toModelInput(img: RgbImage, recipe: 'over255' | 'over127.5'): Float32Array {
  const f = Math.fround;
  const plane = img.width * img.height;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const x = img.rgb[i * 3 + c]!;
      out[c * plane + i] = recipe === 'over255' ? 2 * f(x / 255) - 1 : f(x / 127.5) - 1;
    }
  }
  return out;
}

/** PIL's convert("L") of an RGB picture: ITU-R 601-2 luma in 16-bit fixed point. */
export function luma(img: RgbImage): Uint8Array {
  const out = new Uint8Array(img.width * img.height);
  for (let i = 0; i < out.length; i++) {
    const [r, g, b] = [img.rgb[i * 3]!, img.rgb[i * 3 + 1]!, img.rgb[i * 3 + 2]!];
    out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
  }
  return out;
}

/**
 * The mask at latent resolution, as PIL's resize(..., NEAREST) to 1/8 picks it: the pixel at
 * (8x + 4, 8y + 4) of each 8x8 block, over 255.
 */
export function latentMask(maskLuma: Uint8Array, width: number, height: number): Float32Array {
  const h = height / 8;
  const w = width / 8;
  const out = new Float32Array(h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) out[y * w + x] = maskLuma[(8 * y + 4) * width + 8 * x + 4]! / 255;
  return out;
}

/**
 * The 9-channel inpainting UNet's extra inputs (diffusers' prepare_mask_and_masked_image): the
 * mask at latent size binarised at 0.5, and the picture with the masked pixels (luma >= 127.5)
 * set to 0.
 */
export function inpaintingInputs(image: RgbImage, maskLuma: Uint8Array): { mask: Float32Array; maskedImage: Float32Array } {
  const mask = latentMask(maskLuma, image.width, image.height).map((v) => (v >= 0.5 ? 1 : 0));
  const maskedImage = toModelInput(image, 'over127.5');
  const plane = image.width * image.height;
  for (let c = 0; c < 3; c++) for (let i = 0; i < plane; i++) if (maskLuma[i]! >= 127.5) maskedImage[c * plane + i] = 0;
  return { mask, maskedImage };
}

/**
 * The legacy 4-channel inpainting path's mask (diffusers' OnnxStableDiffusionInpaintPipelineLegacy
 * preprocess_mask): at latent size, `1 - mask / 255` (1 = keep the input), the same for all four
 * latent channels; not binarised.
 */
export function keepMask(maskLuma: Uint8Array, width: number, height: number): Float32Array {
  const m = latentMask(maskLuma, width, height).map((v) => 1 - v);
  const out = new Float32Array(4 * m.length);
  for (let c = 0; c < 4; c++) out.set(m, c * m.length);
  return out;
}
