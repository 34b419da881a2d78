import { imageSeed, type GenerateOptions, type Generation, type Progress, type ResolvedParams } from './params.js';
import type { Preview } from './preview.js';

/**
 * A request for several images (`numImages`, text-to-image only) is that many generations: image
 * k is seeded seed + k (mod 2^32) and is otherwise the same request, so it is the very image a
 * request for that seed alone gives. The generations differ only in their seeds, which no batch
 * key holds, so they fit together by construction and go through the engine's one batching path
 * like any others (batching.ts, thread/batcher.ts): they share UNet runs, up to BATCH_MAX, where
 * that leaves every byte as it would be alone, and run one after another where it would not (or
 * with BATCH_MAX 1).
 *
 * This module splits a planned request into its generations and settles the request once from
 * theirs: with image 0's generation carrying the others in `more`, or with the first error, after
 * which the rest are canceled (a request succeeds whole or not at all).
 */

type Result = { generation: Generation } | { error: unknown };

/** A request, or one of its generations, as the pipeline runs it: its options and its one settle. */
export interface Settling {
  options: GenerateOptions;
  settle(result: Result): void;
}

/** The generations of a planned request: the plan itself for one image, else one per image, each with its seed. */
export function imagesOf<P extends { p: Pick<ResolvedParams, 'seed' | 'numImages'> }>(plan: P): P[] {
  const count = plan.p.numImages;
  if (count === 1) return [plan];
  return Array.from({ length: count }, (_, k) => ({ ...plan, p: { ...plan.p, seed: imageSeed(plan.p.seed, k) } }));
}

/**
 * What each of a request's `count` generations reports to. One generation is the request itself.
 * For several:
 * - the request settles once all have succeeded (image 0 first, the others in `more`), or at the
 *   first failure or cancellation, which cancels the others;
 * - progress counts the steps of all of them (`totalSteps` = count x steps), so it only grows,
 *   whether they share each step or run one after another. Reports of generations stepping
 *   together (in one batch, within one turn of the event loop) come out as one, with the preview
 *   of the lowest-numbered image among them.
 */
export function gatherImages(count: number, request: Settling): Settling[] {
  if (count === 1) return [request];
  const outer = request.options.signal;
  // Aborted by the request's own signal, or by a failure of one of its generations.
  const controller = new AbortController();
  const abort = () => controller.abort();
  if (outer?.aborted) abort();
  else outer?.addEventListener('abort', abort, { once: true });

  let settled = false;
  const finish = (result: Result) => {
    if (settled) return;
    settled = true;
    outer?.removeEventListener('abort', abort);
    request.settle(result);
  };

  const results: Array<Generation | undefined> = [];
  /** performance.now() when the first of them started, from their progress and timings. */
  let firstStart = Number.POSITIVE_INFINITY;
  let left = count;

  const steps = new Array<number>(count).fill(0);
  const onProgress = request.options.onProgress;
  /** What the next report says, once the generations stepping together have all reported. */
  let due: { totalSteps: number; stepMs: number | undefined; shown: { preview: Preview; image: number } | undefined } | undefined;
  const report = (k: number, p: Progress) => {
    const now = performance.now();
    firstStart = Math.min(firstStart, now - p.elapsedMs);
    steps[k] = p.step;
    const first = due === undefined;
    const shown = p.preview && (!due?.shown || k < due.shown.image) ? { preview: p.preview, image: k } : due?.shown;
    due = { totalSteps: count * p.totalSteps, stepMs: p.stepMs, shown };
    // Generations of one batch report one after another, synchronously, at the end of a step.
    if (!first) return;
    queueMicrotask(() => {
      const out = due;
      due = undefined;
      if (!out || settled) return;
      onProgress?.({
        step: steps.reduce((a, b) => a + b, 0),
        totalSteps: out.totalSteps,
        elapsedMs: performance.now() - firstStart,
        ...(out.stepMs !== undefined ? { stepMs: out.stepMs } : {}),
        ...(out.shown ? { preview: out.shown.preview } : {}),
      });
    });
  };

  return Array.from({ length: count }, (_, k): Settling => {
    let done = false;
    return {
      options: {
        ...request.options,
        signal: controller.signal,
        ...(onProgress ? { onProgress: (p: Progress) => report(k, p) } : {}),
      },
      settle(result) {
        if (done) return;
        done = true;
        if ('error' in result) {
          controller.abort();
          finish(result);
          return;
        }
        firstStart = Math.min(firstStart, performance.now() - result.generation.timings.totalMs);
        results[k] = result.generation;
        if (--left === 0) finish({ generation: combine(results as Generation[], performance.now() - firstStart) });
      },
    };
  });
}

/**
 * Image 0's generation with the others in `more`. Timings: each phase summed over the images (each
 * has its own prompt encoding, loop and decode; a UNet run they shared counts for each, as
 * sessionRunMs counts a shared run for every generation in it), the total from the first start to
 * the last image.
 */
function combine(images: Generation[], totalMs: number): Generation {
  const [first, ...rest] = images as [Generation, ...Generation[]];
  const sum = (f: (g: Generation) => number) => images.reduce((a, g) => a + f(g), 0);
  return {
    ...first,
    more: rest.map((g) => ({ png: g.png, seed: g.seed })),
    timings: {
      encodeMs: sum((g) => g.timings.encodeMs),
      denoiseMs: sum((g) => g.timings.denoiseMs),
      decodeMs: sum((g) => g.timings.decodeMs),
      sessionRunMs: sum((g) => g.timings.sessionRunMs),
      totalMs,
    },
    batchSize: Math.max(...images.map((g) => g.batchSize ?? 1)),
  };
}
