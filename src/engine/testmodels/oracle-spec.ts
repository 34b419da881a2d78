/**
 * The oracle model's meaning, in plain TypeScript: which words it knows and which latent
 * ("target image") a prompt stands for. The ONNX graphs in `oracle.ts` compute the same thing;
 * tests use this module to state the picture they expect.
 *
 * A prompt is read as a bag of words. Colour words set the colour (averaged when several),
 * shape words draw a shape (a circle or a square), position words move it by a quarter of the
 * frame, size words scale it. Without a shape word a colour fills the whole frame; an empty
 * prompt is the plain background. Latent channels 0..2 hold RGB in [-1, 1]; channel 3 is 0.
 */

/** Feature slots of the text encoder's hidden state. */
export const F = {
  r: 0,
  g: 1,
  b: 2,
  colourCount: 3,
  circle: 4,
  square: 5,
  xSum: 6,
  xCount: 7,
  ySum: 8,
  yCount: 9,
  sizeSum: 10,
  sizeCount: 11,
} as const;
export const ORACLE_HIDDEN_SIZE = 16;

export const COLOURS: Record<string, [number, number, number]> = {
  red: [1, -1, -1],
  green: [-1, 1, -1],
  blue: [-1, -1, 1],
  yellow: [1, 1, -1],
  cyan: [-1, 1, 1],
  magenta: [1, -1, 1],
  purple: [0, -1, 0.6],
  orange: [1, 0.2, -1],
  pink: [1, 0.2, 0.6],
  white: [1, 1, 1],
  black: [-1, -1, -1],
  gray: [0, 0, 0],
  grey: [0, 0, 0],
};
export const SHAPES = { circle: F.circle, disc: F.circle, dot: F.circle, square: F.square, box: F.square } as const;
export const POSITIONS: Record<string, { x?: number; y?: number }> = {
  left: { x: -1 },
  right: { x: 1 },
  top: { y: -1 },
  bottom: { y: 1 },
  center: { x: 0, y: 0 },
  centre: { x: 0, y: 0 },
  middle: { x: 0, y: 0 },
};
export const SIZES: Record<string, number> = { small: 0.5, tiny: 0.3, big: 1.6, large: 1.6, huge: 2.2 };
/** Words the tokenizer knows as whole tokens but that mean nothing to the oracle. */
export const FILLER_WORDS = ['a', 'an', 'the', 'on', 'in', 'at', 'of', 'and', 'with', 'photo', 'picture'];

export const BACKGROUND: [number, number, number] = [-0.2, -0.2, -0.2];
/** The colour of a shape when the prompt names none. */
export const DEFAULT_COLOUR: [number, number, number] = [0.9, 0.9, 0.9];
/** Radius (circle) or half side (square) in units of the frame, before size words. */
export const BASE_RADIUS = 0.22;
/** How far a position word moves the centre, in units of the frame. */
export const POSITION_STEP = 0.25;

export function oracleVocabularyWords(): string[] {
  return [...Object.keys(COLOURS), ...Object.keys(SHAPES), ...Object.keys(POSITIONS), ...Object.keys(SIZES), ...FILLER_WORDS];
}

/** The feature vector one word contributes (all zero for words the oracle ignores). */
export function wordFeatures(word: string): Float32Array {
  const f = new Float32Array(ORACLE_HIDDEN_SIZE);
  const colour = COLOURS[word];
  if (colour) {
    f[F.r] = colour[0];
    f[F.g] = colour[1];
    f[F.b] = colour[2];
    f[F.colourCount] = 1;
  }
  const shape = (SHAPES as Record<string, number>)[word];
  if (shape !== undefined) f[shape] = 1;
  const pos = POSITIONS[word];
  if (pos) {
    if (pos.x !== undefined) {
      f[F.xSum] = pos.x;
      f[F.xCount] = 1;
    }
    if (pos.y !== undefined) {
      f[F.ySum] = pos.y;
      f[F.yCount] = 1;
    }
  }
  const size = SIZES[word];
  if (size !== undefined) {
    f[F.sizeSum] = size;
    f[F.sizeCount] = 1;
  }
  return f;
}

/** Sums word features the way the UNet sums the hidden states over tokens. */
export function promptFeatures(prompt: string): Float32Array {
  const sum = new Float32Array(ORACLE_HIDDEN_SIZE);
  for (const word of prompt.toLowerCase().match(/[a-z]+/g) ?? []) {
    const f = wordFeatures(word);
    for (let i = 0; i < sum.length; i++) sum[i]! += f[i]!;
  }
  return sum;
}

/** Decoded geometry of a prompt: what the UNet graph computes from the summed features. */
export function oracleScene(features: Float32Array) {
  const at = (k: number) => features[k]!;
  const colourCount = at(F.colourCount);
  const colour: [number, number, number] = colourCount > 0.5 ? [at(F.r) / colourCount, at(F.g) / colourCount, at(F.b) / colourCount] : [...DEFAULT_COLOUR];
  const cx = 0.5 + (POSITION_STEP * at(F.xSum)) / Math.max(at(F.xCount), 1);
  const cy = 0.5 + (POSITION_STEP * at(F.ySum)) / Math.max(at(F.yCount), 1);
  const radius = BASE_RADIUS * (at(F.sizeCount) > 0.5 ? at(F.sizeSum) / at(F.sizeCount) : 1);
  return {
    colour,
    circle: at(F.circle) > 0.5,
    square: at(F.square) > 0.5,
    fillsFrame: at(F.circle) + at(F.square) <= 0.5 && colourCount > 0.5,
    cx,
    cy,
    radius,
  };
}

/** The target latent [4, h, w] (channels-first) the oracle's UNet denoises towards. */
export function oracleTargetLatent(prompt: string, h: number, w: number): Float32Array {
  const scene = oracleScene(promptFeatures(prompt));
  const out = new Float32Array(4 * h * w);
  for (let i = 0; i < h; i++) {
    const y = (i + 0.5) / h - scene.cy;
    for (let j = 0; j < w; j++) {
      const x = (j + 0.5) / w - scene.cx;
      const inCircle = scene.circle && x * x + y * y <= scene.radius * scene.radius;
      const inSquare = scene.square && Math.max(Math.abs(x), Math.abs(y)) <= scene.radius;
      const m = inCircle || inSquare || scene.fillsFrame ? 1 : 0;
      for (let c = 0; c < 3; c++) out[c * h * w + i * w + j] = BACKGROUND[c]! + m * (scene.colour[c]! - BACKGROUND[c]!);
    }
  }
  return out;
}

/**
 * The latent classifier-free guidance converges to with an exact noise predictor:
 * eps_u + g (eps_c - eps_u) is the exact predictor of T_u + g (T_c - T_u).
 */
export function guidedTargetLatent(prompt: string, negativePrompt: string, guidance: number, h: number, w: number): Float32Array {
  const c = oracleTargetLatent(prompt, h, w);
  if (guidance <= 1) return c;
  const u = oracleTargetLatent(negativePrompt, h, w);
  return c.map((v, i) => u[i]! + guidance * (v - u[i]!));
}

/**
 * The RGB image (HWC, 0..255) the oracle VAE decodes a latent to: each latent cell becomes an
 * 8x8 block (nearest upsampling), values mapped from [-1, 1] and clamped as the pipeline does.
 */
export function oracleImage(latent: Float32Array, h: number, w: number): Uint8Array {
  const H = h * 8;
  const W = w * 8;
  const img = new Uint8Array(H * W * 3);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const cell = Math.floor(y / 8) * w + Math.floor(x / 8);
      for (let c = 0; c < 3; c++) {
        const v = Math.min(1, Math.max(0, latent[c * h * w + cell]! / 2 + 0.5));
        img[(y * W + x) * 3 + c] = Math.round(v * 255);
      }
    }
  }
  return img;
}
