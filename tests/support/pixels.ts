/** Pixel arithmetic the picture tests share. */

export interface RgbImage {
  data: Buffer;
  width: number;
  height: number;
}

export function meanAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`compared arrays differ in length: ${a.length} and ${b.length}`);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]! - b[i]!);
  return s / a.length;
}

export function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Centroid (x, y in 0..1) of the pixels whose colour is close to `rgb`, and the fraction of the frame they cover. */
export function centroidOf(img: RgbImage, rgb: [number, number, number]) {
  let sx = 0;
  let sy = 0;
  let n = 0;
  for (let y = 0; y < img.height; y++) {
    for (let x = 0; x < img.width; x++) {
      const i = (y * img.width + x) * 3;
      const d = Math.abs(img.data[i]! - rgb[0]) + Math.abs(img.data[i + 1]! - rgb[1]) + Math.abs(img.data[i + 2]! - rgb[2]);
      if (d < 60) {
        sx += x;
        sy += y;
        n++;
      }
    }
  }
  return { x: sx / n / img.width, y: sy / n / img.height, fraction: n / (img.width * img.height) };
}

/**
 * An inpainting result split by a mask: the mean absolute difference from the input outside it
 * (per channel value), and the share of pixels inside it that `painted` accepts.
 */
export function inpaintingStats(
  out: ArrayLike<number>,
  input: ArrayLike<number>,
  width: number,
  height: number,
  inMask: (x: number, y: number) => boolean,
  painted: (rgb: [number, number, number]) => boolean,
): { keptMeanAbs: number; paintedShare: number } {
  let keptDiff = 0;
  let kept = 0;
  let inside = 0;
  let accepted = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      if (inMask(x, y)) {
        inside++;
        if (painted([out[i]!, out[i + 1]!, out[i + 2]!])) accepted++;
      } else {
        kept++;
        for (let c = 0; c < 3; c++) keptDiff += Math.abs(out[i + c]! - input[i + c]!);
      }
    }
  }
  return { keptMeanAbs: keptDiff / (3 * kept), paintedShare: accepted / inside };
}
