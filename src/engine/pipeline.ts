import path from 'node:path';
import { batchPolicy, modeFor, type BatchOptions, type BatchPolicy } from './batching.js';
import { imageToImagePlan, keepMasked } from './image-to-image.js';
import { checkSize, decodeImage, inpaintingInputs, keepMask, luma, toModelInput, type RgbImage } from './input-images.js';
import type { LoadedModel } from './model.js';
import { invalid, resolveParams, type GenerateOptions, type GenerateParams, type Generation, type ResolvedParams } from './params.js';
import { encodePng } from './png.js';
import { latentPreview } from './preview.js';
import { encodePrompt } from './prompt.js';
import { NumpyRandomState } from './random.js';
import { createScheduler, type Scheduler } from './schedulers/index.js';
import { gatherImages, imagesOf } from './several-images.js';
import { addTimeIds, Denoiser, guidanceEmbedding, type UnetConditioning } from './unet.js';
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
 *
 * Several generations that agree on size, timesteps and guidance layout can run that loop
 * together, sharing each step's UNet run (src/engine/batching.ts says when that leaves every
 * byte as it would be alone). Everything else stays each generation's own: its prompt encoding,
 * generator, scheduler, guidance scale, progress, cancellation and failure. A request for several
 * images is several such generations, one per seed (several-images.ts).
 */

type Mode = 'txt2img' | 'img2img' | 'inpaint' | 'inpaint-legacy';

/** A request checked against the model, before any model runs. */
export interface PlannedGeneration {
  p: ResolvedParams;
  image?: RgbImage;
  mask?: RgbImage;
  mode: Mode;
  /** Runs the UNet on an unconditional and a conditional row (classifier-free guidance). */
  guided: boolean;
  /** Generations with equal keys may share UNet runs; undefined: this one runs alone. */
  batchKey: string | undefined;
}

export interface BatchMember {
  plan: PlannedGeneration;
  options: GenerateOptions;
  /** When the generation started, for its timings (default: when its batch prepares it). */
  started?: number;
  /** Called once, as soon as this generation is done or has failed; the others go on. */
  settle(result: { generation: Generation } | { error: unknown }): void;
}

/** One generation of a batch, between its prompt encoding and its decoding. */
interface Job {
  member: BatchMember;
  p: ResolvedParams;
  mode: Mode;
  cond: UnetConditioning;
  scheduler: Scheduler;
  rng: NumpyRandomState;
  latents: Float32Array;
  /** Inpainting: mask and masked-image latents, the UNet's channels after the latents. */
  extra?: Float32Array;
  legacy?: { input: Float32Array; noise: Float32Array; keep: Float32Array };
  timesteps: Float64Array;
  warnings: string[];
  started: number;
  encodeMs: number;
  /** Time inside session.run on its behalf, shared runs counted whole. */
  runMs: number;
  denoiseMs: number;
  /** The most generations that shared a UNet run with it, itself included. */
  batchSize: number;
}

export class StableDiffusionPipeline {
  readonly batching: BatchPolicy;

  constructor(
    readonly model: LoadedModel,
    batch: BatchOptions = {},
  ) {
    this.batching = batchPolicy(model, batch);
  }

  /**
   * One request: its generations (one per image, several-images.ts) share UNet runs as far as
   * the batching rule lets them, else run one after another.
   */
  async generate(params: GenerateParams, options: GenerateOptions = {}): Promise<Generation> {
    const started = performance.now();
    const plan = await this.plan(params);
    const images = imagesOf(plan);
    return new Promise<Generation>((resolve, reject) => {
      const settle = (r: { generation: Generation } | { error: unknown }) =>
        'error' in r ? reject(r.error instanceof Error ? r.error : new Error(String(r.error))) : resolve(r.generation);
      const members = gatherImages(images.length, { options, settle }).map((m, k): BatchMember => ({
        plan: images[k]!,
        ...m,
        ...(images.length === 1 ? { started } : {}),
      }));
      const size = plan.batchKey === undefined ? 1 : this.batching.max;
      void (async () => {
        for (let i = 0; i < members.length; i += size) await this.run(members.slice(i, i + size));
      })().catch(reject);
    });
  }

  /** 1. Check inputs: parameters, and the input picture and mask against them and the model. */
  async plan(params: GenerateParams): Promise<PlannedGeneration> {
    const { variant } = this.model;
    const inputs = await this.decodeInputs(params);
    const p = resolveParams(params, this.model.defaults, inputs.image);
    if (inputs.image) checkSize(inputs.image, 'image', p.width, p.height, '`width` and `height` are');
    if (inputs.mask) checkSize(inputs.mask, 'mask', inputs.image!.width, inputs.image!.height, '`image` is');
    const mode: Mode = inputs.image ? (inputs.mask ? (variant.inpainting ? 'inpaint' : 'inpaint-legacy') : 'img2img') : 'txt2img';
    // A UNet with a guidance embedding takes the guidance as an input instead of a second batch.
    const guided = p.guidanceScale > 1 && !variant.guidanceEmbedding;
    // What fixes the UNet's input shape and the timesteps the loop walks; seeds, prompts and
    // guidance scales stay each generation's own.
    const shape = [p.width, p.height, p.scheduler, p.numSteps, mode, mode === 'img2img' || mode === 'inpaint-legacy' ? p.strength : null, guided];
    const batchKey = modeFor(this.batching, guided) === 'alone' ? undefined : JSON.stringify(shape);
    return { p, ...inputs, mode, guided, batchKey };
  }

  /**
   * Runs generations that share a batch key (or one alone) and settles each. Resolves once the
   * models are idle: the PNG encodings may still be running then, so the caller can start the
   * next batch while they finish.
   */
  async run(members: readonly BatchMember[]): Promise<void> {
    const jobs: Job[] = [];
    for (const member of members.map(settlingOnce)) {
      try {
        jobs.push(await this.prepare(member));
      } catch (error) {
        member.settle({ error });
      }
    }
    let done: Job[];
    try {
      done = await this.denoise(jobs);
    } catch (error) {
      for (const job of jobs) job.member.settle({ error });
      return;
    }
    for (const job of done) {
      try {
        await this.finish(job);
      } catch (error) {
        job.member.settle({ error });
      }
    }
  }

  /** 2-4. Prompt embeddings, timesteps and initial latents of one generation. */
  private async prepare(member: BatchMember): Promise<Job> {
    const started = member.started ?? performance.now();
    throwIfAborted(member.options.signal);
    const runBefore = this.model.sessionRunMs();
    const { model } = this;
    const { variant } = model;
    const { p, mode, guided } = member.plan;
    const warnings: string[] = [];
    const h = p.height / 8;
    const w = p.width / 8;
    const n = 4 * h * w;

    // 2. Prompt embeddings, unconditional batch first; the conditioning fixed for the whole run.
    const prompt = await encodePrompt(model, p, guided, warnings);
    const timestepCond = variant.guidanceEmbeddingDim ? guidanceEmbedding(p.guidanceScale, variant.guidanceEmbeddingDim) : undefined;
    const cond: UnetConditioning = {
      prompt,
      guidanceScale: p.guidanceScale,
      ...(variant.family === 'sdxl' ? { timeIds: addTimeIds(p.height, p.width) } : {}),
      ...(timestepCond ? { timestepCond } : {}),
    };

    // 3. Timesteps: all of them, or the last `strength` part for an input picture.
    const scheduler = createScheduler(p.scheduler, model.schedulerConfig);
    scheduler.setTimesteps(p.numSteps);
    const plan =
      (mode === 'img2img' || mode === 'inpaint-legacy') && p.strength! > 0
        ? imageToImagePlan(scheduler.timesteps, p.numSteps, p.strength!, stepsOffset(model), variant.family === 'sdxl' ? 'optimum-sdxl' : 'diffusers-onnx')
        : undefined;

    // 4. Initial latents: numpy's standard normals, scaled to the first noise level, or the input
    //    picture's latents noised to where the run starts.
    const rng = new NumpyRandomState(p.seed);
    let latents: Float32Array;
    let extra: Float32Array | undefined;
    let legacy: Job['legacy'];
    const { image, mask } = member.plan;
    if (mode === 'txt2img' || mode === 'inpaint') {
      latents = rng.randn(n);
      if (mode === 'inpaint') {
        const { mask: latentMask, maskedImage } = inpaintingInputs(image!, luma(mask!));
        extra = new Float32Array(5 * h * w);
        extra.set(latentMask);
        extra.set(await encodeImage(model, maskedImage, p.height, p.width), h * w);
      }
      for (let i = 0; i < n; i++) latents[i]! *= scheduler.initNoiseSigma;
    } else {
      const input = await encodeImage(model, toModelInput(image!, 'over255'), p.height, p.width);
      // Strength 0 keeps the input as it is: no noise, no steps (the references would still add
      // the last timestep's noise, or with steps_offset 0 all of it).
      const noise = plan ? rng.randn(n) : new Float32Array(n);
      latents = plan ? scheduler.addNoise(input, noise, plan.noiseTimestep) : input;
      if (mode === 'inpaint-legacy') legacy = { input, noise, keep: keepMask(luma(mask!), p.width, p.height) };
    }
    const timesteps = mode === 'txt2img' || mode === 'inpaint' ? scheduler.timesteps : (plan?.timesteps ?? new Float64Array(0));
    return {
      member,
      p,
      mode,
      cond,
      scheduler,
      rng,
      latents,
      ...(extra ? { extra } : {}),
      ...(legacy ? { legacy } : {}),
      timesteps,
      warnings,
      started,
      encodeMs: performance.now() - started,
      runMs: this.model.sessionRunMs() - runBefore,
      denoiseMs: 0,
      batchSize: 1,
    };
  }

  /**
   * 5. The denoising loop, each step one UNet run for every generation still in it. A canceled
   * generation leaves between steps and the others go on. If a shared run fails (a batch too big
   * for memory), each generation runs its steps alone from there, so each meets only its own
   * failure; rows are computed alike either way, so the bytes do not change. Returns the
   * generations that finished their steps.
   */
  private async denoise(jobs: Job[]): Promise<Job[]> {
    const first = jobs[0];
    if (!first) return [];
    const { timesteps } = first;
    if (jobs.some((j) => j.timesteps.length !== timesteps.length || j.timesteps.some((t, i) => t !== timesteps[i]))) {
      throw new Error('generations with different timesteps cannot share a batch');
    }
    const padTo = modeFor(this.batching, first.member.plan.guided) === 'fixed' ? this.batching.max : 1;
    const denoiser = (group: Job[]) =>
      new Denoiser(
        this.model,
        group.map((j) => j.cond),
        first.p.height / 8,
        first.p.width / 8,
        padTo,
      );
    const denoiseStart = performance.now();
    let active = jobs;
    let shared: { denoiser: Denoiser; size: number } | undefined;
    const alone = new Map<Job, Denoiser>();
    for (let i = 0; i < timesteps.length; i++) {
      active = active.filter(stillWanted);
      if (active.length === 0) break;
      const stepStart = performance.now();
      const t = timesteps[i]!;
      const inputs = active.map((job) => job.scheduler.scaleModelInput(job.latents, t));
      let eps: Array<Float32Array | Error> | undefined;
      if (alone.size === 0) {
        // Membership only shrinks: a new size means a new set of conditioning rows.
        if (shared?.size !== active.length) shared = { denoiser: denoiser(active), size: active.length };
        eps = await this.predictTogether(shared.denoiser, active, inputs, t);
      }
      if (!eps) {
        for (const job of active) if (!alone.has(job)) alone.set(job, denoiser([job]));
        eps = await this.predictAlone(alone, active, inputs, t);
      }
      const next: Job[] = [];
      for (const [k, job] of active.entries()) {
        try {
          const e = eps[k]!;
          if (e instanceof Error) throw e;
          this.step(job, e, t, i, timesteps.length, stepStart);
          next.push(job);
        } catch (error) {
          job.member.settle({ error });
        }
      }
      active = next;
    }
    const denoiseMs = performance.now() - denoiseStart;
    for (const job of active) job.denoiseMs = denoiseMs;
    return active.filter(stillWanted);
  }

  /** One UNet run for all of `jobs`; undefined when a shared run failed and they must go on alone. */
  private async predictTogether(d: Denoiser, jobs: Job[], inputs: Float32Array[], t: number): Promise<Array<Float32Array | Error> | undefined> {
    const runBefore = this.model.sessionRunMs();
    try {
      const eps = await d.predict(
        inputs,
        t,
        jobs.map((j) => j.extra),
      );
      for (const job of jobs) {
        job.runMs += this.model.sessionRunMs() - runBefore;
        job.batchSize = Math.max(job.batchSize, jobs.length);
      }
      return eps;
    } catch (err) {
      return jobs.length === 1 ? [err as Error] : undefined;
    }
  }

  private async predictAlone(alone: Map<Job, Denoiser>, jobs: Job[], inputs: Float32Array[], t: number): Promise<Array<Float32Array | Error>> {
    const eps: Array<Float32Array | Error> = [];
    for (const [k, job] of jobs.entries()) {
      const runBefore = this.model.sessionRunMs();
      eps.push(
        await alone
          .get(job)!
          .predict([inputs[k]!], t, [job.extra])
          .then(
            ([e]) => e!,
            (err: unknown) => err as Error,
          ),
      );
      job.runMs += this.model.sessionRunMs() - runBefore;
    }
    return eps;
  }

  /** One generation's scheduler step (with its own generator), inpainting blend and progress. */
  private step(job: Job, eps: Float32Array, t: number, i: number, total: number, stepStart: number): void {
    job.latents = job.scheduler.step(eps, t, job.latents, job.rng);
    // Legacy inpainting puts the input back outside the mask, noised to the step just taken.
    if (job.legacy) job.latents = keepMasked(job.latents, job.scheduler.addNoise(job.legacy.input, job.legacy.noise, t), job.legacy.keep);
    const { onProgress, previewEvery = 0 } = job.member.options;
    if (!onProgress) return;
    const wantPreview = previewEvery > 0 && ((i + 1) % previewEvery === 0 || i + 1 === total);
    onProgress({
      step: i + 1,
      totalSteps: total,
      elapsedMs: performance.now() - job.started,
      stepMs: performance.now() - stepStart,
      ...(wantPreview ? { preview: latentPreview(job.latents, job.p.height / 8, job.p.width / 8) } : {}),
    });
  }

  /**
   * 6. Decode, then encode the PNG. Resolves after the VAE: the PNG is encoded off this thread
   * (sharp), and the generation settles when it is done.
   */
  private async finish(job: Job): Promise<void> {
    const { p, mode, member } = job;
    const { variant } = this.model;
    const decodeStart = performance.now();
    const runBefore = this.model.sessionRunMs();
    const rgb = await decodeLatents(
      this.model,
      job.latents,
      p.height / 8,
      p.width / 8,
      variant.family === 'sdxl' || variant.guidanceEmbedding ? 'divide' : 'reciprocal',
    );
    const runMs = job.runMs + this.model.sessionRunMs() - runBefore;
    void encodePng(rgb, p.width, p.height, pngText(p, mode, path.basename(this.model.dir))).then(
      (png) => {
        const now = performance.now();
        member.settle({
          generation: {
            png,
            seed: p.seed,
            width: p.width,
            height: p.height,
            numSteps: p.numSteps,
            guidanceScale: p.guidanceScale,
            scheduler: p.scheduler,
            ...(p.strength !== null && mode !== 'inpaint' ? { strength: p.strength } : {}),
            timings: { encodeMs: job.encodeMs, denoiseMs: job.denoiseMs, decodeMs: now - decodeStart, totalMs: now - job.started, sessionRunMs: runMs },
            warnings: job.warnings,
            batchSize: job.batchSize,
            ...(member.options.returnLatents ? { latents: job.latents } : {}),
          },
        });
      },
      (error: unknown) => member.settle({ error }),
    );
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

/** A member whose settle() takes effect once: a generation fails or succeeds, never both. */
function settlingOnce(member: BatchMember): BatchMember {
  let settled = false;
  return {
    ...member,
    settle(result) {
      if (settled) return;
      settled = true;
      member.settle(result);
    },
  };
}

/** False, and the generation settled as canceled, once its signal has fired. */
function stillWanted(job: Job): boolean {
  try {
    throwIfAborted(job.member.options.signal);
    return true;
  } catch (error) {
    job.member.settle({ error });
    return false;
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
