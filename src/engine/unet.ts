import type { LoadedModel } from './model.js';
import { floatTensor, timestepTensor, type ort } from './onnx/runtime.js';
import type { PromptEmbeddings } from './prompt.js';

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

export class Denoiser {
  private readonly outName: string;
  /** Every input but sample and timestep, made once per generation: [cond], and [uncond] or [uncond, cond]. */
  private readonly cond: ConditioningFeeds;
  private readonly uncond: ConditioningFeeds | undefined;
  /** Exports with a fixed batch of 1 need two UNet runs per step for guidance; others take both at once. */
  private readonly both: ConditioningFeeds | undefined;

  constructor(
    private readonly model: LoadedModel,
    private readonly c: UnetConditioning,
    private readonly h: number,
    private readonly w: number,
  ) {
    const unet = model.unet;
    this.outName = unet.outputs.has('out_sample') ? 'out_sample' : [...unet.outputs.keys()][0]!;
    const { prompt } = c;
    const batchCarrying = ['sample', 'encoder_hidden_states', 'text_embeds', 'time_ids', 'timestep_cond'].filter((n) => unet.inputs.has(n));
    const batched = batchCarrying.every((n) => unet.input(n).shape[0] !== 1);
    this.cond = this.feeds([prompt.cond], [prompt.pooled]);
    if (prompt.uncond && batched) this.both = this.feeds([prompt.uncond, prompt.cond], [prompt.uncondPooled, prompt.pooled]);
    else if (prompt.uncond) this.uncond = this.feeds([prompt.uncond], [prompt.uncondPooled]);
  }

  /**
   * The (guided) noise prediction for the scaled latents at timestep t. `extra` holds channels
   * the UNet takes after the latents (inpainting: mask and masked-image latents), per image.
   */
  async predict(input: Float32Array, t: number, extra?: Float32Array): Promise<Float32Array> {
    const sample = extra ? concat(input, extra) : input;
    const n = input.length;
    const scale = this.c.guidanceScale;
    if (this.both) {
      const out = await this.run(concat(sample, sample), t, this.both);
      return guide(out.subarray(0, n), out.subarray(n, 2 * n), scale);
    }
    if (this.uncond) return guide(await this.run(sample, t, this.uncond), await this.run(sample, t, this.cond), scale);
    return this.run(sample, t, this.cond);
  }

  private feeds(hidden: Float32Array[], pooled: Array<Float32Array | undefined>): ConditioningFeeds {
    const unet = this.model.unet;
    const batch = hidden.length;
    const { seq, hidden: width } = this.c.prompt;
    const feeds: Record<string, ort.Tensor> = {
      encoder_hidden_states: floatTensor(unet.input('encoder_hidden_states'), concat(...hidden), [batch, seq, width]),
    };
    if (unet.inputs.has('text_embeds')) {
      const p = pooled.map((x) => x!);
      feeds.text_embeds = floatTensor(unet.input('text_embeds'), concat(...p), [batch, p[0]!.length]);
      feeds.time_ids = floatTensor(unet.input('time_ids'), repeat(this.c.timeIds!, batch), [batch, this.c.timeIds!.length]);
    }
    if (unet.inputs.has('timestep_cond')) {
      const cond = this.c.timestepCond!;
      feeds.timestep_cond = floatTensor(unet.input('timestep_cond'), repeat(cond, batch), [batch, cond.length]);
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

function repeat(x: Float32Array, times: number): Float32Array {
  return concat(...Array.from({ length: times }, () => x));
}
