import { MAX_SEED, randomSeed } from './random.js';
import { isSchedulerName, SCHEDULER_NAMES, type SchedulerName } from './schedulers/index.js';
import type { Preview } from './preview.js';

/**
 * What a generation is asked for and what it returns: the engine's public surface, shared by
 * the pipeline, the engine thread and the synthetic engine. Fields added since text-to-image are
 * optional, so callers written before them keep working.
 */

/**
 * Defaults and limits of a generation, defined once: the engine checks them (resolveParams) and
 * the API validates requests against the same numbers (src/core/params.ts). The textbook's
 * defaults: 50 steps, guidance 9.0, 512x512; a model's configs may choose others
 * (ModelDefaults). The compute a request may ask for is bounded separately by the service
 * (MAX_PIXEL_STEPS: width x height x steps).
 */
export const GENERATION_DEFAULTS = {
  numSteps: 50,
  guidanceScale: 9.0,
  width: 512,
  height: 512,
} as const;

export const GENERATION_LIMITS = {
  maxSteps: 150,
  minSide: 64,
  maxSide: 2048,
  maxGuidance: 30,
  /** In Unicode code points; CLIP keeps 75 tokens of it, the rest is reported as truncated. */
  maxPromptChars: 2000,
} as const;

export interface GenerateParams {
  prompt: string;
  negativePrompt?: string | null;
  /** Defaults to what the model is made for (50; turbo 1; LCM 4). */
  numSteps?: number;
  /** Defaults to what the model is made for (9; SDXL 5; turbo 0; LCM 8.5). */
  guidanceScale?: number;
  /** 0 .. 2^32-1; a random one is drawn (and reported) when absent. */
  seed?: number | null;
  /** Default: the input image's size, else the model's native size (512; SDXL 1024). */
  width?: number;
  height?: number;
  /** Defaults to the scheduler the model ships with, else PNDM. */
  scheduler?: SchedulerName;
  /**
   * Image-to-image and inpainting: the input picture as an encoded PNG, JPEG or WebP file
   * (bytes cross the engine thread boundary as they are; the thread decodes them).
   */
  image?: Uint8Array | null;
  /** Inpainting: a picture of `image`'s size, white where to paint, black where to keep. */
  mask?: Uint8Array | null;
  /**
   * Image-to-image (and the 4-channel inpainting path): how much of the input is redrawn, from
   * 0 (the input as it is) to 1 (from noise). Default 0.8 (SD) or 0.3 (SDXL), as diffusers and
   * optimum. The 9-channel inpainting UNet always starts from noise and takes no strength.
   */
  strength?: number | null;
  /**
   * Images from one request, 1..MAX_IMAGES (default 1), text-to-image only: image k is its own
   * generation seeded seed + k (mod 2^32), so each is, byte for byte, the image a request with
   * that seed alone gives (several-images.ts; batched only as batching.ts allows).
   */
  numImages?: number;
}

/** Most images one request makes. */
export const MAX_IMAGES = 4;

/** The seed of image k of a request seeded `seed`. */
export function imageSeed(seed: number, k: number): number {
  return (seed + k) % 2 ** 32;
}

/** Defaults a model directory implies (see variant.ts), used for the parameters a request leaves out. */
export interface ModelDefaults {
  scheduler: SchedulerName | undefined;
  numSteps: number;
  guidanceScale: number;
  width: number;
  height: number;
  strength: number;
}

export const SD_DEFAULTS: ModelDefaults = { ...GENERATION_DEFAULTS, scheduler: undefined, strength: 0.8 };

export interface Progress {
  step: number;
  totalSteps: number;
  elapsedMs: number;
  /** This denoising step alone (UNet runs and scheduler), in milliseconds. */
  stepMs?: number;
  preview?: Preview;
}

export interface GenerateOptions {
  onProgress?: (progress: Progress) => void;
  /** Compute a latent preview every `previewEvery` steps (0 = never). */
  previewEvery?: number;
  /** Checked between denoising steps; a canceled generation throws an AbortError. */
  signal?: AbortSignal;
  /** Keep the final latents in the result (tests compare them with the oracle's target). */
  returnLatents?: boolean;
}

export interface Timings {
  encodeMs: number;
  denoiseMs: number;
  decodeMs: number;
  totalMs: number;
  /** Time inside onnxruntime's session.run for this generation, all models. */
  sessionRunMs: number;
}

export interface Generation {
  png: Buffer;
  seed: number;
  width: number;
  height: number;
  /** Steps asked for; image-to-image runs only the last `strength` part of them. */
  numSteps: number;
  guidanceScale: number;
  scheduler: SchedulerName;
  /** Set for image-to-image and the 4-channel inpainting path. */
  strength?: number;
  timings: Timings;
  /** Human-readable warnings (prompt truncation). */
  warnings: string[];
  /**
   * The most generations that shared a UNet run with this one, itself included (1: it ran
   * alone); for a request of several images, with any of them (its own images count).
   */
  batchSize?: number;
  latents?: Float32Array;
  /** Images 1.. of a request for several (numImages), with their seeds; image 0 is `png` and `seed`. */
  more?: Array<{ png: Buffer; seed: number }>;
}

/** Thrown for parameters that can never work; the message says which and why. */
export class InvalidParamsError extends Error {
  override name = 'InvalidParamsError';
}

export function invalid(message: string): never {
  throw new InvalidParamsError(message);
}

export interface ResolvedParams {
  prompt: string;
  negativePrompt: string;
  /** The request left the negative prompt out (SDXL then uses zero embeddings, as diffusers). */
  negativePromptAbsent: boolean;
  numSteps: number;
  guidanceScale: number;
  seed: number;
  width: number;
  height: number;
  scheduler: SchedulerName;
  /** null unless an input image is given. */
  strength: number | null;
  /** Images the request asks for; the pipeline runs each as a generation of its own, seed + k (several-images.ts). */
  numImages: number;
}

/**
 * Fills in defaults and checks every number. `imageSize` (the decoded input image, when there
 * is one) is the default width and height.
 */
export function resolveParams(p: GenerateParams, defaults: ModelDefaults, imageSize?: { width: number; height: number }): ResolvedParams {
  if (typeof p.prompt !== 'string') invalid('`prompt` has to be a string');
  if (p.negativePrompt != null && typeof p.negativePrompt !== 'string') invalid('`negative_prompt` has to be a string or null');
  const width = p.width ?? imageSize?.width ?? defaults.width;
  const height = p.height ?? imageSize?.height ?? defaults.height;
  if (imageSize && p.width == null && p.height == null && (width % 8 !== 0 || height % 8 !== 0)) {
    invalid(`\`image\` is ${width}x${height} pixels; its sides have to be divisible by 8`);
  }
  if (!Number.isInteger(width) || !Number.isInteger(height) || width % 8 !== 0 || height % 8 !== 0) {
    invalid(`\`height\` and \`width\` have to be divisible by 8 but are ${height} and ${width}`);
  }
  const { minSide, maxSide, maxSteps, maxGuidance } = GENERATION_LIMITS;
  if (width < minSide || height < minSide || width > maxSide || height > maxSide) {
    invalid(`\`height\` and \`width\` have to be between ${minSide} and ${maxSide} but are ${height} and ${width}`);
  }
  const numSteps = p.numSteps ?? defaults.numSteps;
  if (!Number.isInteger(numSteps) || numSteps < 1 || numSteps > maxSteps)
    invalid(`\`num_steps\` has to be an integer from 1 to ${maxSteps} but is ${numSteps}`);
  const guidanceScale = p.guidanceScale ?? defaults.guidanceScale;
  if (!Number.isFinite(guidanceScale) || guidanceScale < 0 || guidanceScale > maxGuidance) {
    invalid(`\`guidance_scale\` has to be a number from 0 to ${maxGuidance} but is ${guidanceScale}`);
  }
  const seed = p.seed ?? randomSeed();
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) invalid(`\`seed\` has to be an integer from 0 to ${MAX_SEED} but is ${seed}`);
  const scheduler = p.scheduler ?? defaults.scheduler ?? 'pndm';
  if (!isSchedulerName(scheduler)) invalid(`\`scheduler\` has to be one of ${SCHEDULER_NAMES.join(', ')} but is ${String(scheduler)}`);
  let strength: number | null = null;
  if (p.strength != null) {
    if (!p.image) invalid('`strength` applies to image-to-image: give an `image` too, or leave `strength` out');
    strength = p.strength;
  } else if (p.image) {
    strength = defaults.strength;
  }
  if (strength !== null && !(Number.isFinite(strength) && strength >= 0 && strength <= 1)) {
    invalid(`\`strength\` has to be a number from 0 to 1 but is ${strength}`);
  }
  const numImages = p.numImages ?? 1;
  if (!Number.isInteger(numImages) || numImages < 1 || numImages > MAX_IMAGES)
    invalid(`\`num_images\` has to be an integer from 1 to ${MAX_IMAGES} but is ${numImages}`);
  if (numImages > 1 && (p.image || p.mask)) invalid('`num_images` above 1 is for text-to-image only; leave out `image` and `mask`, or ask for one image');
  return {
    prompt: p.prompt,
    negativePrompt: p.negativePrompt ?? '',
    negativePromptAbsent: p.negativePrompt == null,
    numSteps,
    guidanceScale,
    seed,
    width,
    height,
    scheduler,
    strength,
    numImages,
  };
}
