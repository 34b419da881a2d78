import type { LoadedModel } from './model.js';
import { floatTensor, timestepTensor, type ort } from './onnx/runtime.js';
import type { PromptEmbeddings } from './prompt.js';
import { BATCH_CARRYING_INPUTS } from './batching.js';

/**
 * One noise prediction per denoising step: the UNet's inputs for each variant, classifier-free
 * guidance with the unconditional batch first, and the conditioning that does not change
 * between steps (SDXL's time_ids and pooled text_embeds, LCM's guidance embedding).
 */

export interface UnetConditioning {
  prompt: PromptEmbeddings;
  guidanceScale: number;
  /** SDXL's add_time_ids: original size, crop top-left, target size. */
  timeIds?: Float32Array;
  /** LCM-distilled UNets: the embedding of guidance_scale - 1 (timestep_cond). */
  timestepCond?: Float32Array;
}

/**
 * The UNet runs of one or more generations that share their size, timesteps and guidance layout
 * (src/engine/batching.ts says which may). Rows are laid out as diffusers lays out a batch of
 * prompts: every unconditional row first, then every conditional one, [u1..uk, c1..ck]; for one
 * generation that is the reference's own [uncond, cond].
 */
export class Denoiser {
  private readonly outName: string;
  /** Every input but sample and timestep, made once for this set of generations: [c...], and [u...] or [u..., c...]. */
  private readonly cond: ConditioningFeeds;
  private readonly uncond: ConditioningFeeds | undefined;
  /** Exports with a fixed batch of 1 need two UNet runs per step for guidance; others take both at once. */
  private readonly both: ConditioningFeeds | undefined;
  /** Rows per half: the generations, then copies of the first up to `padTo`. */
  private readonly rows: number;

  constructor(
    private readonly model: LoadedModel,
    private readonly c: readonly UnetConditioning[],
    private readonly h: number,
    private readonly w: number,
    /** Fill every run up to this many generations with copies of the first (BatchMode 'fixed'). */
    padTo = c.length,
  ) {
    const unet = model.unet;
    this.outName = unet.outputs.has('out_sample') ? 'out_sample' : [...unet.outputs.keys()][0]!;
    if (c.length === 0) throw new Error('Denoiser: no generation to run');
    this.rows = Math.max(padTo, c.length);
    const padded = this.padded(c);
    const prompts = padded.map((x) => x.prompt);
    const guided = prompts[0]!.uncond !== undefined;
    if (prompts.some((p) => (p.uncond !== undefined) !== guided)) throw new Error('Denoiser: generations with and without guidance cannot share a UNet run');
    const batchCarrying = BATCH_CARRYING_INPUTS.filter((n) => unet.inputs.has(n));
    const batched = batchCarrying.every((n) => unet.input(n).shape[0] !== 1);
    if (!batched && this.rows > 1) throw new Error(`${unet.file}: declares a batch of 1; it runs one generation at a time`);
    const cond = padded.map((x) => ({ hidden: x.prompt.cond, pooled: x.prompt.pooled, timeIds: x.timeIds, timestepCond: x.timestepCond }));
    this.cond = this.feeds(cond);
    if (guided) {
      const uncond = padded.map((x) => ({ hidden: x.prompt.uncond!, pooled: x.prompt.uncondPooled, timeIds: x.timeIds, timestepCond: x.timestepCond }));
      if (batched) this.both = this.feeds([...uncond, ...cond]);
      else this.uncond = this.feeds(uncond);
    }
  }

  /**
   * The (guided) noise prediction for each generation's scaled latents at timestep t, in the
   * order the generations were given. `extra` holds channels the UNet takes after the latents
   * (inpainting: mask and masked-image latents), per generation.
   */
  async predict(inputs: readonly Float32Array[], t: number, extra?: ReadonlyArray<Float32Array | undefined>): Promise<Float32Array[]> {
    const k = this.c.length;
    if (inputs.length !== k) throw new Error(`Denoiser: ${inputs.length} inputs for ${k} generations`);
    const samples = this.padded(inputs.map((x, i) => (extra?.[i] ? concat(x, extra[i]) : x)));
    const n = inputs[0]!.length;
    const rows = this.rows;
    const sample = concat(...samples);
    if (this.both) {
      const out = await this.run(concat(sample, sample), t, this.both);
      return this.c.map((c, i) => guide(out.subarray(i * n, (i + 1) * n), out.subarray((rows + i) * n, (rows + i + 1) * n), c.guidanceScale));
    }
    if (this.uncond) {
      // A fixed batch of 1: one generation, two runs, unconditional first as the reference.
      const uncond = await this.run(sample, t, this.uncond);
      return [guide(uncond, await this.run(sample, t, this.cond), this.c[0]!.guidanceScale)];
    }
    const out = await this.run(sample, t, this.cond);
    return this.c.map((_, i) => (k === 1 && rows === 1 ? out : out.slice(i * n, (i + 1) * n)));
  }

  /** The generations' items followed by copies of the first, up to the padded row count. */
  private padded<T>(items: readonly T[]): T[] {
    return [...items, ...Array.from({ length: this.rows - items.length }, () => items[0]!)];
  }

  private feeds(
    rows: Array<{ hidden: Float32Array; pooled?: Float32Array | undefined; timeIds?: Float32Array | undefined; timestepCond?: Float32Array | undefined }>,
  ): ConditioningFeeds {
    const unet = this.model.unet;
    const batch = rows.length;
    const { seq, hidden: width } = this.c[0]!.prompt;
    const feeds: Record<string, ort.Tensor> = {
      encoder_hidden_states: floatTensor(unet.input('encoder_hidden_states'), concat(...rows.map((r) => r.hidden)), [batch, seq, width]),
    };
    if (unet.inputs.has('text_embeds')) {
      const pooled = rows.map((r) => r.pooled!);
      feeds.text_embeds = floatTensor(unet.input('text_embeds'), concat(...pooled), [batch, pooled[0]!.length]);
      const ids = rows.map((r) => r.timeIds!);
      feeds.time_ids = floatTensor(unet.input('time_ids'), concat(...ids), [batch, ids[0]!.length]);
    }
    if (unet.inputs.has('timestep_cond')) {
      const cond = rows.map((r) => r.timestepCond!);
      feeds.timestep_cond = floatTensor(unet.input('timestep_cond'), concat(...cond), [batch, cond[0]!.length]);
    }
    return { batch, feeds };
  }

  private async run(sample: Float32Array, t: number, fixed: ConditioningFeeds): Promise<Float32Array> {
    const unet = this.model.unet;
    const channels = sample.length / fixed.batch / (this.h * this.w);
    const feeds = {
      ...fixed.feeds,
      sample: floatTensor(unet.input('sample'), sample, [fixed.batch, channels, this.h, this.w]),
      timestep: timestepTensor(unet.input('timestep'), t),
    };
    return (await unet.run(feeds, [this.outName]))[this.outName]!;
  }
}

interface ConditioningFeeds {
  batch: number;
  feeds: Record<string, ort.Tensor>;
}

/** SDXL's add_time_ids for a height x width image generated whole: (h, w) + (0, 0) + (h, w). */
export function addTimeIds(height: number, width: number): Float32Array {
  return Float32Array.of(height, width, 0, 0, height, width);
}

/**
 * The guidance embedding LCM-distilled UNets take as timestep_cond, as optimum's
 * ORTLatentConsistencyModelPipeline computes it: sinusoids of w = guidance_scale - 1 scaled by
 * 1000 (VDM's timestep embedding), in float32 with numpy 1.x casting (a float64 scalar meets a
 * float32 array in float32). sin and cos are rounded from float64; numpy's float32 kernels may
 * differ from them in the last bit.
 */
export function guidanceEmbedding(guidanceScale: number, dim: number): Float32Array {
  const f = Math.fround;
  const w = f(f(guidanceScale - 1) * 1000);
  const half = Math.floor(dim / 2);
  const step = f(-(Math.log(10000) / (half - 1)));
  const out = new Float32Array(dim); // an odd dim leaves the zero padding at the end
  for (let k = 0; k < half; k++) {
    const arg = f(w * f(Math.exp(f(k * step))));
    out[k] = Math.sin(arg);
    out[half + k] = Math.cos(arg);
  }
  return out;
}

function guide(uncond: Float32Array, cond: Float32Array, scale: number): Float32Array {
  const out = new Float32Array(uncond.length);
  for (let i = 0; i < out.length; i++) out[i] = uncond[i]! + scale * (cond[i]! - uncond[i]!);
  return out;
}

export function concat(...parts: Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0]!;
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
