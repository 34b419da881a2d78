import path from 'node:path';
import type { LoadedModel } from './model.js';
import { floatTensor, intTensor, timestepTensor, type OnnxModel } from './onnx/runtime.js';
import { encodePng } from './png.js';
import { latentPreview, type Preview } from './preview.js';
import { MAX_SEED, NumpyRandomState, randomSeed } from './random.js';
import { createScheduler, isSchedulerName, SCHEDULER_NAMES, type SchedulerName } from './schedulers/index.js';

/**
 * Text-to-image in the order of diffusers' OnnxStableDiffusionPipeline, so that the same
 * model directory, seed and scheduler give the same image there and here:
 *
 *   check inputs -> encode prompt and negative prompt -> initial latents -> set timesteps
 *   -> loop (scale input, UNet, guidance, step, progress) -> decode -> PNG
 */

/**
 * Defaults and limits of a generation, defined once: the engine checks them (resolveParams) and
 * the API validates requests against the same numbers (src/core/params.ts). The textbook's
 * defaults: 50 steps, guidance 9.0, 512x512. The compute a request may ask for is bounded
 * separately by the service (MAX_PIXEL_STEPS: width x height x steps).
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
  numSteps?: number;
  guidanceScale?: number;
  /** 0 .. 2^32-1; a random one is drawn (and reported) when absent. */
  seed?: number | null;
  width?: number;
  height?: number;
  /** Defaults to the scheduler the model ships with, else PNDM. */
  scheduler?: SchedulerName;
}

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
  /** Time inside onnxruntime's session.run for this generation, all three models. */
  sessionRunMs: number;
}

export interface Generation {
  png: Buffer;
  seed: number;
  width: number;
  height: number;
  numSteps: number;
  guidanceScale: number;
  scheduler: SchedulerName;
  timings: Timings;
  /** Human-readable warnings (prompt truncation). */
  warnings: string[];
  latents?: Float32Array;
}

/** Thrown for parameters that can never work; the message says which and why. */
export class InvalidParamsError extends Error {
  override name = 'InvalidParamsError';
}

export interface ResolvedParams {
  prompt: string;
  negativePrompt: string;
  numSteps: number;
  guidanceScale: number;
  seed: number;
  width: number;
  height: number;
  scheduler: SchedulerName;
}

export function resolveParams(p: GenerateParams, defaultScheduler: SchedulerName | undefined): ResolvedParams {
  const fail = (msg: string): never => {
    throw new InvalidParamsError(msg);
  };
  if (typeof p.prompt !== 'string') fail('`prompt` has to be a string');
  if (p.negativePrompt != null && typeof p.negativePrompt !== 'string') fail('`negative_prompt` has to be a string or null');
  const width = p.width ?? GENERATION_DEFAULTS.width;
  const height = p.height ?? GENERATION_DEFAULTS.height;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width % 8 !== 0 || height % 8 !== 0) {
    fail(`\`height\` and \`width\` have to be divisible by 8 but are ${height} and ${width}`);
  }
  const { minSide, maxSide, maxSteps, maxGuidance } = GENERATION_LIMITS;
  if (width < minSide || height < minSide || width > maxSide || height > maxSide) {
    fail(`\`height\` and \`width\` have to be between ${minSide} and ${maxSide} but are ${height} and ${width}`);
  }
  const numSteps = p.numSteps ?? GENERATION_DEFAULTS.numSteps;
  if (!Number.isInteger(numSteps) || numSteps < 1 || numSteps > maxSteps) fail(`\`num_steps\` has to be an integer from 1 to ${maxSteps} but is ${numSteps}`);
  const guidanceScale = p.guidanceScale ?? GENERATION_DEFAULTS.guidanceScale;
  if (!Number.isFinite(guidanceScale) || guidanceScale < 0 || guidanceScale > maxGuidance) {
    fail(`\`guidance_scale\` has to be a number from 0 to ${maxGuidance} but is ${guidanceScale}`);
  }
  const seed = p.seed ?? randomSeed();
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) fail(`\`seed\` has to be an integer from 0 to ${MAX_SEED} but is ${seed}`);
  const scheduler = p.scheduler ?? defaultScheduler ?? 'pndm';
  if (!isSchedulerName(scheduler)) fail(`\`scheduler\` has to be one of ${SCHEDULER_NAMES.join(', ')} but is ${String(scheduler)}`);
  return { prompt: p.prompt, negativePrompt: p.negativePrompt ?? '', numSteps, guidanceScale, seed, width, height, scheduler };
}

export class StableDiffusionPipeline {
  constructor(readonly model: LoadedModel) {}

  async generate(params: GenerateParams, options: GenerateOptions = {}): Promise<Generation> {
    const started = performance.now();
    const runBefore = this.sessionRunMs();
    const p = resolveParams(params, this.model.defaultScheduler);
    const { model } = this;
    const warnings: string[] = [];
    const doGuidance = p.guidanceScale > 1;

    // 1. Prompt embeddings, unconditional batch first.
    const cond = await this.encode(p.prompt, 'prompt', warnings);
    const uncond = doGuidance ? await this.encode(p.negativePrompt, 'negative prompt', warnings) : undefined;
    const encodeMs = performance.now() - started;
    throwIfAborted(options.signal);

    // 2. Initial latents from numpy's legacy generator, scaled to the scheduler's first sigma.
    const h = p.height / 8;
    const w = p.width / 8;
    const n = 4 * h * w;
    const rng = new NumpyRandomState(p.seed);
    const scheduler = createScheduler(p.scheduler, model.schedulerConfig);
    scheduler.setTimesteps(p.numSteps);
    let latents = rng.randn(n);
    for (let i = 0; i < n; i++) latents[i]! *= scheduler.initNoiseSigma;

    // 3. Denoising loop.
    const unet = model.unet;
    const sampleSpec = unet.input('sample');
    const ehsSpec = unet.input('encoder_hidden_states');
    const tSpec = unet.input('timestep');
    const outName = unet.outputs.has('out_sample') ? 'out_sample' : [...unet.outputs.keys()][0]!;
    // Exports with a fixed batch of 1 need two UNet runs per step for guidance.
    const batched = doGuidance && sampleSpec.shape[0] !== 1 && ehsSpec.shape[0] !== 1;
    const seq = cond.length / this.hiddenSize(cond);
    const hidden = this.hiddenSize(cond);
    const ehsBoth = uncond && batched ? concat(uncond, cond) : undefined;
    const denoiseStart = performance.now();
    const timesteps = scheduler.timesteps;
    for (let i = 0; i < timesteps.length; i++) {
      throwIfAborted(options.signal);
      const stepStart = performance.now();
      const t = timesteps[i]!;
      const input = scheduler.scaleModelInput(latents, t);
      let eps: Float32Array;
      const run = async (sample: Float32Array, ehs: Float32Array, batch: number) =>
        (
          await unet.run(
            {
              sample: floatTensor(sampleSpec, sample, [batch, 4, h, w]),
              timestep: timestepTensor(tSpec, t),
              encoder_hidden_states: floatTensor(ehsSpec, ehs, [batch, seq, hidden]),
            },
            [outName],
          )
        )[outName]!;
      if (!uncond) {
        eps = await run(input, cond, 1);
      } else if (ehsBoth) {
        const out = await run(concat(input, input), ehsBoth, 2);
        eps = guide(out.subarray(0, n), out.subarray(n, 2 * n), p.guidanceScale);
      } else {
        eps = guide(await run(input, uncond, 1), await run(input, cond, 1), p.guidanceScale);
      }
      latents = scheduler.step(eps, t, latents, rng);
      if (options.onProgress) {
        const every = options.previewEvery ?? 0;
        const wantPreview = every > 0 && ((i + 1) % every === 0 || i + 1 === timesteps.length);
        options.onProgress({
          step: i + 1,
          totalSteps: timesteps.length,
          elapsedMs: performance.now() - started,
          stepMs: performance.now() - stepStart,
          ...(wantPreview ? { preview: latentPreview(latents, h, w) } : {}),
        });
      }
    }
    const denoiseMs = performance.now() - denoiseStart;
    throwIfAborted(options.signal);

    // 4. Decode and encode the PNG.
    const decodeStart = performance.now();
    const rgb = await this.decode(latents, h, w);
    const png = await encodePng(rgb, p.width, p.height, pngText(p, path.basename(model.dir)));
    const decodeMs = performance.now() - decodeStart;

    return {
      png,
      seed: p.seed,
      width: p.width,
      height: p.height,
      numSteps: p.numSteps,
      guidanceScale: p.guidanceScale,
      scheduler: p.scheduler,
      timings: {
        encodeMs,
        denoiseMs,
        decodeMs,
        totalMs: performance.now() - started,
        sessionRunMs: this.sessionRunMs() - runBefore,
      },
      warnings,
      ...(options.returnLatents ? { latents } : {}),
    };
  }

  private sessionRunMs(): number {
    const m = this.model;
    return m.textEncoder.runMs + m.unet.runMs + m.vaeDecoder.runMs;
  }

  private hiddenSize(embeddings: Float32Array): number {
    const declared = this.model.unet.input('encoder_hidden_states').shape[2];
    if (typeof declared === 'number' && declared > 0) return declared;
    return embeddings.length / this.model.tokenizer.modelMaxLength;
  }

  private async encode(text: string, what: string, warnings: string[]): Promise<Float32Array> {
    const { tokenizer, textEncoder } = this.model;
    const enc = tokenizer.encode(text);
    if (enc.truncated) {
      warnings.push(`${what} truncated to ${tokenizer.modelMaxLength - 2} tokens: ${enc.droppedTokens} tokens dropped ("${enc.droppedText}")`);
    }
    const outName = textEncoder.outputs.has('last_hidden_state') ? 'last_hidden_state' : [...textEncoder.outputs.keys()][0]!;
    const out = await textEncoder.run({ input_ids: intTensor(textEncoder.input('input_ids'), enc.ids, [1, enc.ids.length]) }, [outName]);
    return out[outName]!;
  }

  /** latents -> HWC RGB bytes, as diffusers: decode(latents / factor), clip(x / 2 + 0.5), round(x * 255). */
  private async decode(latents: Float32Array, h: number, w: number): Promise<Uint8Array> {
    const vae: OnnxModel = this.model.vaeDecoder;
    const spec = vae.input('latent_sample');
    const scaled = latents.map((v) => v / this.model.vaeScalingFactor);
    const outName = vae.outputs.has('sample') ? 'sample' : [...vae.outputs.keys()][0]!;
    const img = (await vae.run({ latent_sample: floatTensor(spec, scaled, [1, 4, h, w]) }, [outName]))[outName]!;
    const H = h * 8;
    const W = w * 8;
    if (img.length !== 3 * H * W) throw new Error(`${vae.file}: decoded ${img.length} values; expected 3 x ${H} x ${W}`);
    const rgb = new Uint8Array(H * W * 3);
    const plane = H * W;
    for (let c = 0; c < 3; c++) {
      for (let i = 0; i < plane; i++) {
        const v = Math.min(1, Math.max(0, img[c * plane + i]! / 2 + 0.5));
        rgb[i * 3 + c] = roundHalfEven(v * 255);
      }
    }
    return rgb;
  }
}

function guide(uncond: Float32Array, cond: Float32Array, scale: number): Float32Array {
  const out = new Float32Array(uncond.length);
  for (let i = 0; i < out.length; i++) out[i] = uncond[i]! + scale * (cond[i]! - uncond[i]!);
  return out;
}

function concat(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** numpy's round(): halves go to the even neighbour. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    const err = new Error('generation canceled');
    err.name = 'AbortError';
    throw err;
  }
}

function pngText(p: ResolvedParams, modelName: string): Record<string, string> {
  const lines = [
    p.prompt,
    ...(p.negativePrompt ? [`Negative prompt: ${p.negativePrompt}`] : []),
    `Steps: ${p.numSteps}, Sampler: ${p.scheduler}, CFG scale: ${p.guidanceScale}, Seed: ${p.seed}, Size: ${p.width}x${p.height}, Model: ${modelName}`,
  ];
  return {
    parameters: lines.join('\n'),
    prompt: p.prompt,
    negative_prompt: p.negativePrompt,
    num_steps: String(p.numSteps),
    guidance_scale: String(p.guidanceScale),
    seed: String(p.seed),
    scheduler: p.scheduler,
    size: `${p.width}x${p.height}`,
    model: modelName,
    Software: 't2i',
  };
}
