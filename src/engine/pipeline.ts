import path from 'node:path';
import { imageToImagePlan, keepMasked } from './image-to-image.js';
import { checkSize, decodeImage, inpaintingInputs, keepMask, luma, toModelInput, type RgbImage } from './input-images.js';
import type { LoadedModel } from './model.js';
import { invalid, resolveParams, type GenerateOptions, type GenerateParams, type Generation, type ResolvedParams } from './params.js';
import { encodePng } from './png.js';
import { latentPreview } from './preview.js';
import { encodePrompt } from './prompt.js';
import { NumpyRandomState } from './random.js';
import { createScheduler } from './schedulers/index.js';
import { addTimeIds, Denoiser, guidanceEmbedding } from './unet.js';
import { decodeLatents, encodeImage } from './vae.js';

export * from './params.js';

/**
 * Stable Diffusion 1.x/2.x and SDXL, text-to-image, image-to-image and inpainting, in the
 * order of the reference pipelines, so that the same model directory, seed and scheduler give
 * the same image there and here:
 *
 *   SD 1.x/2.x     diffusers' OnnxStableDiffusionPipeline, ...Img2ImgPipeline,
 *                  ...InpaintPipeline (9-channel UNet) and ...InpaintPipelineLegacy (4-channel)
 *   SDXL           optimum's ORTStableDiffusionXLPipeline and ...Img2ImgPipeline (numpy era)
 *   LCM            optimum's ORTLatentConsistencyModelPipeline (a UNet taking timestep_cond)
 *
 *   check inputs -> encode prompt and negative prompt -> timesteps -> initial latents
 *   -> loop (scale input, UNet, guidance, step, [inpaint blend], progress) -> decode -> PNG
 *
 * Every variant draws its one batch of starting noise from numpy's legacy generator, as the
 * references do; schedulers that add noise while stepping continue that stream (the references
 * draw it from torch's global generator, which no seed reaches).
 */
export class StableDiffusionPipeline {
  constructor(readonly model: LoadedModel) {}

  async generate(params: GenerateParams, options: GenerateOptions = {}): Promise<Generation> {
    const started = performance.now();
    const runBefore = this.model.sessionRunMs();
    const { model } = this;
    const { variant } = model;
    const warnings: string[] = [];

    // 1. Check inputs: parameters, and the input picture and mask against them and the model.
    const inputs = await this.decodeInputs(params);
    const p = resolveParams(params, model.defaults, inputs.image);
    if (inputs.image) checkSize(inputs.image, 'image', p.width, p.height, '`width` and `height` are');
    if (inputs.mask) checkSize(inputs.mask, 'mask', inputs.image!.width, inputs.image!.height, '`image` is');
    const h = p.height / 8;
    const w = p.width / 8;
    const n = 4 * h * w;
    // A UNet with a guidance embedding takes the guidance as an input instead of a second batch.
    const doGuidance = p.guidanceScale > 1 && !variant.guidanceEmbedding;

    // 2. Prompt embeddings, unconditional batch first; the conditioning fixed for the whole run.
    const prompt = await encodePrompt(model, p, doGuidance, warnings);
    const timestepCond = variant.guidanceEmbeddingDim ? guidanceEmbedding(p.guidanceScale, variant.guidanceEmbeddingDim) : undefined;
    const denoiser = new Denoiser(
      model,
      {
        prompt,
        guidanceScale: p.guidanceScale,
        ...(variant.family === 'sdxl' ? { timeIds: addTimeIds(p.height, p.width) } : {}),
        ...(timestepCond ? { timestepCond } : {}),
      },
      h,
      w,
    );

    // 3. Timesteps: all of them, or the last `strength` part for an input picture.
    const scheduler = createScheduler(p.scheduler, model.schedulerConfig);
    scheduler.setTimesteps(p.numSteps);
    const mode = inputs.image ? (inputs.mask ? (variant.inpainting ? 'inpaint' : 'inpaint-legacy') : 'img2img') : 'txt2img';
    const plan =
      (mode === 'img2img' || mode === 'inpaint-legacy') && p.strength! > 0
        ? imageToImagePlan(scheduler.timesteps, p.numSteps, p.strength!, stepsOffset(model), variant.family === 'sdxl' ? 'optimum-sdxl' : 'diffusers-onnx')
        : undefined;

    // 4. Initial latents: numpy's standard normals, scaled to the first noise level, or the input
    //    picture's latents noised to where the run starts.
    const rng = new NumpyRandomState(p.seed);
    let latents: Float32Array;
    let extraChannels: Float32Array | undefined;
    let legacy: { input: Float32Array; noise: Float32Array; keep: Float32Array } | undefined;
    if (mode === 'txt2img' || mode === 'inpaint') {
      latents = rng.randn(n);
      if (mode === 'inpaint') {
        const { mask, maskedImage } = inpaintingInputs(inputs.image!, luma(inputs.mask!));
        extraChannels = new Float32Array(5 * h * w);
        extraChannels.set(mask);
        extraChannels.set(await encodeImage(model, maskedImage, p.height, p.width), h * w);
      }
      for (let i = 0; i < n; i++) latents[i]! *= scheduler.initNoiseSigma;
    } else {
      const input = await encodeImage(model, toModelInput(inputs.image!, 'over255'), p.height, p.width);
      // Strength 0 keeps the input as it is: no noise, no steps (the references would still add
      // the last timestep's noise, or with steps_offset 0 all of it).
      const noise = plan ? rng.randn(n) : new Float32Array(n);
      latents = plan ? scheduler.addNoise(input, noise, plan.noiseTimestep) : input;
      if (mode === 'inpaint-legacy') legacy = { input, noise, keep: keepMask(luma(inputs.mask!), p.width, p.height) };
    }
    const encodeMs = performance.now() - started;
    throwIfAborted(options.signal);

    // 5. Denoising loop.
    const denoiseStart = performance.now();
    const timesteps = mode === 'txt2img' || mode === 'inpaint' ? scheduler.timesteps : (plan?.timesteps ?? new Float64Array(0));
    for (let i = 0; i < timesteps.length; i++) {
      throwIfAborted(options.signal);
      const stepStart = performance.now();
      const t = timesteps[i]!;
      const eps = await denoiser.predict(scheduler.scaleModelInput(latents, t), t, extraChannels);
      latents = scheduler.step(eps, t, latents, rng);
      // Legacy inpainting puts the input back outside the mask, noised to the step just taken.
      if (legacy) latents = keepMasked(latents, scheduler.addNoise(legacy.input, legacy.noise, t), legacy.keep);
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

    // 6. Decode and encode the PNG.
    const decodeStart = performance.now();
    const rgb = await decodeLatents(model, latents, h, w, variant.family === 'sdxl' || variant.guidanceEmbedding ? 'divide' : 'reciprocal');
    const png = await encodePng(rgb, p.width, p.height, pngText(p, mode, path.basename(model.dir)));
    const decodeMs = performance.now() - decodeStart;

    return {
      png,
      seed: p.seed,
      width: p.width,
      height: p.height,
      numSteps: p.numSteps,
      guidanceScale: p.guidanceScale,
      scheduler: p.scheduler,
      ...(p.strength !== null && mode !== 'inpaint' ? { strength: p.strength } : {}),
      timings: {
        encodeMs,
        denoiseMs,
        decodeMs,
        totalMs: performance.now() - started,
        sessionRunMs: model.sessionRunMs() - runBefore,
      },
      warnings,
      ...(options.returnLatents ? { latents } : {}),
    };
  }

  /** The input picture and mask, decoded, with what the model can and cannot do with them. */
  private async decodeInputs(params: GenerateParams): Promise<{ image?: RgbImage; mask?: RgbImage }> {
    const { variant } = this.model;
    if (params.mask && !params.image) invalid('`mask` needs an `image` to inpaint');
    if (variant.inpainting && !params.mask) invalid(`this is an inpainting model (${variant.name}): it needs an \`image\` and a \`mask\``);
    if (params.mask && variant.family === 'sdxl') invalid('`mask`: inpainting is not supported for SDXL models here');
    if (variant.inpainting && params.strength != null)
      invalid('`strength` does not apply to a 9-channel inpainting model, which always starts from noise; leave it out');
    if (!params.image) return {};
    if (!this.model.hasVaeEncoder) invalid('`image`: this model has no vae_encoder/model.onnx, which image-to-image and inpainting need');
    const image = await decodeImage(params.image, 'image');
    return { image, ...(params.mask ? { mask: await decodeImage(params.mask, 'mask') } : {}) };
  }
}

function stepsOffset(model: LoadedModel): number {
  const offset = model.schedulerConfig.steps_offset;
  return typeof offset === 'number' ? offset : 0;
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    const err = new Error('generation canceled');
    err.name = 'AbortError';
    throw err;
  }
}

function pngText(p: ResolvedParams, mode: string, modelName: string): Record<string, string> {
  const strength = p.strength !== null && mode !== 'inpaint' ? `, Denoising strength: ${p.strength}` : '';
  const lines = [
    p.prompt,
    ...(p.negativePrompt ? [`Negative prompt: ${p.negativePrompt}`] : []),
    `Steps: ${p.numSteps}, Sampler: ${p.scheduler}, CFG scale: ${p.guidanceScale}, Seed: ${p.seed}, Size: ${p.width}x${p.height}, Model: ${modelName}${strength}`,
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
    ...(mode !== 'txt2img' ? { mode } : {}),
    ...(strength ? { strength: String(p.strength) } : {}),
    Software: 't2i',
  };
}
