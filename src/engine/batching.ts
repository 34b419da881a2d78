import { availableParallelism } from 'node:os';
import type { LoadedModel } from './model.js';

/**
 * When generations may share a UNet run, and how, so that a batched image is byte-identical to
 * the same generation run alone on the same engine.
 *
 * Everything but the UNet is per generation whatever the batch: its own prompt encoding, RNG,
 * scheduler, guidance arithmetic, VAE decode. The UNet is the one shared call, and its rows come
 * out exactly as they would alone only if the execution provider computes each row the same way
 * whatever else the batch holds. Two ways to get that:
 *
 * - `rows`: batches of any size, where the provider is known to compute rows independently of
 *   the batch size. onnxruntime's CPU kernels (MLAS) are, with one exception measured on
 *   diffusers' own export: with more than one intra-op thread, a convolution over a batch of one
 *   image is split across threads by output columns, and MLAS then picks a longer K block for
 *   the narrower slices (MlasConvOperation: `StrideK *= 2` while `StrideN / 2 >= CountN`), which
 *   sums in a different order; from two images up, each thread takes whole images and every
 *   batch size rounds alike (1,500 of 2,048 values of a down-block differ between batch 1 and 2
 *   at 2 threads; none between 2, 3, 4, 6 and 8; none at all with 1 thread). A generation with
 *   guidance runs its UNet on two rows (unconditional and conditional) even alone, so it always
 *   batches; one without guidance runs on one row alone, so it batches only with one thread.
 * - `fixed`: every UNet call of the layout has the same shape, `max` generations, unused rows
 *   filled with copies of the first. The same shapes select the same kernels, so each row is
 *   computed the same way whether its neighbours are real or copies. This is what a GPU needs:
 *   cuDNN's algorithm search and cuBLAS's heuristics choose kernels (and split-K reductions) per
 *   shape, so rows of a batch of 2 and of 8 may round differently. The price is that a lone
 *   generation pays for `max` rows.
 * - `alone`: one generation per UNet run.
 */

export type BatchMode = 'rows' | 'fixed' | 'alone';

export interface BatchPolicy {
  /** Most generations in one UNet run (1 when nothing batches). */
  max: number;
  /** With classifier-free guidance (two UNet rows per generation). */
  guided: BatchMode;
  /** Without (turbo, LCM, guidance <= 1): one row per generation. */
  unguided: BatchMode;
  /** What loading says about it: one line. */
  summary: string;
}

export interface BatchOptions {
  /** BATCH_MAX: most generations per UNet run; 1 turns batching off. */
  max?: number;
  /** onnxruntime intra-op threads the sessions were opened with (undefined: all cores). */
  threads?: number | undefined;
  /** Batches of one fixed shape whatever the provider (what GPUs get): tests run that path on CPU. */
  fixedShape?: boolean;
}

/** The UNet inputs whose first dimension is the batch. */
export const BATCH_CARRYING_INPUTS = ['sample', 'encoder_hidden_states', 'text_embeds', 'time_ids', 'timestep_cond'] as const;

/** The first dimension a UNet export fixes for its batch-carrying inputs, or undefined when it is symbolic. */
export function fixedBatchOf(model: Pick<LoadedModel, 'unet'>): number | undefined {
  for (const name of BATCH_CARRYING_INPUTS) {
    const d = model.unet.inputs.get(name)?.shape[0];
    if (typeof d === 'number' && d > 0) return d;
  }
  return undefined;
}

export function batchPolicy(model: Pick<LoadedModel, 'unet' | 'provider'>, options: BatchOptions = {}): BatchPolicy {
  const max = Math.max(1, Math.floor(options.max ?? 1));
  const alone = (summary: string): BatchPolicy => ({ max: 1, guided: 'alone', unguided: 'alone', summary });
  if (max === 1) return alone('batching: off (BATCH_MAX 1), one generation per UNet run');
  const fixed = fixedBatchOf(model);
  if (fixed !== undefined) {
    const sample = model.unet.inputs.get('sample');
    return alone(
      `batching: off, one generation at a time: ${model.unet.file} declares a fixed batch of ${fixed} (sample [${sample?.shape.join(', ') ?? '?'}]); export it with a symbolic batch dimension to batch`,
    );
  }
  if (model.provider !== 'cpu' || options.fixedShape) {
    return {
      max,
      guided: 'fixed',
      unguided: 'fixed',
      summary: `batching: up to ${max} generations per UNet run, always at that shape on ${model.provider} (rows are identical only through identical kernels; a lone generation pays for ${max})`,
    };
  }
  const oneThread = options.threads === 1 || (options.threads === undefined && availableParallelism() === 1);
  return {
    max,
    guided: 'rows',
    unguided: oneThread ? 'rows' : 'alone',
    summary: oneThread
      ? `batching: up to ${max} generations per UNet run`
      : `batching: up to ${max} generations per UNet run with guidance; without guidance one at a time (onnxruntime's CPU kernels round a one-row batch differently from larger ones when they use more than one thread; ORT_THREADS=1 lifts this)`,
  };
}

/** How a generation with (or without) guidance may share its UNet runs under `policy`. */
export function modeFor(policy: BatchPolicy, guided: boolean): BatchMode {
  return guided ? policy.guided : policy.unguided;
}
