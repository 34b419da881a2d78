import type { GenerateOptions, GenerateParams, Generation, ResolvedParams } from '../params.js';
import { gatherImages, imagesOf, type Settling } from '../several-images.js';

/**
 * The engine thread's queue: generations wait here, and the ones that can share UNet runs (the
 * pipeline gives them equal batch keys) leave together, up to the pipeline's batch size. The
 * first in line is never passed over: it leaves with whatever compatible generations are there
 * once the batch is full or it has waited `waitMs`, counted from its arrival (so in a busy
 * engine, where it already waited for the previous batch, it does not wait again). One batch
 * uses the models at a time; the next starts as soon as the previous one's models are idle,
 * while its PNGs are still being encoded.
 *
 * A submission (one request, one job) for several images queues one generation per image, in
 * order and together (several-images.ts): they share batches with each other, and with other
 * submissions' generations, exactly as separate requests would; the submission settles once.
 */

export interface Planned {
  /** Generations with equal keys may share a UNet run; undefined: this one runs alone. */
  batchKey: string | undefined;
  /** The request's seed and number of images: image k is its own generation, seeded seed + k. */
  p: Pick<ResolvedParams, 'seed' | 'numImages'>;
}

export interface Member<P extends Planned> {
  plan: P;
  options: GenerateOptions;
  settle(result: { generation: Generation } | { error: unknown }): void;
}

/** What the batcher needs of a pipeline (the real one, or the test double). */
export interface BatchingPipeline<P extends Planned> {
  readonly batching: { readonly max: number };
  /** Checks a request; throws for parameters that can never work. */
  plan(params: GenerateParams): Promise<P>;
  /** Runs a batch; resolves once the models are idle (members may still be settling). */
  run(members: ReadonlyArray<Member<P>>): Promise<void>;
}

export interface Submission {
  id: number;
  params: GenerateParams;
  previewEvery: number;
  returnLatents: boolean;
  /** Run in a batch of its own images only (the host suspects it of taking down an engine with others). */
  alone: boolean;
}

export interface BatcherEvents {
  /** Some of the submission's generations left the queue in a batch with those of `submissions` submissions, itself included. */
  started(id: number, submissions: number): void;
  progress: (id: number, progress: Parameters<NonNullable<GenerateOptions['onProgress']>>[0]) => void;
  done(id: number, generation: Generation): void;
  failed(id: number, error: unknown): void;
}

/** One generation in line: a submission's only one, or one of its images. */
interface Waiting<P extends Planned> {
  submission: Submission;
  plan: P;
  /** Its options (signal, progress) and settle, which settle the submission once all of its generations have. */
  generation: Settling;
  arrived: number;
}

export class Batcher<P extends Planned> {
  private waiting: Array<Waiting<P>> = [];
  /** Every submission not yet settled, waiting or running, by id. */
  private readonly controllers = new Map<number, AbortController>();
  private busy = false;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly pipeline: BatchingPipeline<P>,
    private readonly waitMs: number,
    private readonly events: BatcherEvents,
  ) {}

  async submit(submission: Submission): Promise<void> {
    const { id } = submission;
    const controller = new AbortController();
    this.controllers.set(id, controller);
    let plan: P;
    try {
      plan = await this.pipeline.plan(submission.params);
      if (controller.signal.aborted || this.closed) throw abortError();
    } catch (error) {
      this.controllers.delete(id);
      this.events.failed(id, error);
      return;
    }
    let settled = false;
    const request: Settling = {
      options: {
        signal: controller.signal,
        previewEvery: submission.previewEvery,
        returnLatents: submission.returnLatents,
        onProgress: (progress) => this.events.progress(id, progress),
      },
      settle: (result) => {
        if (settled) return;
        settled = true;
        this.controllers.delete(id);
        // Its images still in line (after another of them failed) have nothing left to do.
        this.waiting = this.waiting.filter((w) => w.submission !== submission);
        if ('error' in result) this.events.failed(id, result.error);
        else this.events.done(id, result.generation);
      },
    };
    const images = imagesOf(plan);
    const generations = gatherImages(images.length, request);
    const arrived = performance.now();
    for (const [k, image] of images.entries()) this.waiting.push({ submission, plan: image, generation: generations[k]!, arrived });
    this.pump();
  }

  /** Waiting generations leave the queue at once; running ones stop between steps. */
  cancel(id: number): void {
    this.controllers.get(id)?.abort();
    const mine = this.waiting.filter((w) => w.submission.id === id);
    if (mine.length === 0) return;
    this.waiting = this.waiting.filter((w) => w.submission.id !== id);
    for (const w of mine) w.generation.settle({ error: abortError() });
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    for (const id of [...this.controllers.keys()]) this.cancel(id);
  }

  private pump(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.busy || this.closed || this.waiting.length === 0) return;
    const head = this.waiting[0]!;
    const key = head.plan.batchKey;
    const max = key === undefined ? 1 : this.pipeline.batching.max;
    // A submission run alone still shares runs among its own images, which are all in line already.
    const fits = (w: Waiting<P>) =>
      w !== head && key !== undefined && w.plan.batchKey === key && (w.submission === head.submission || (!head.submission.alone && !w.submission.alone));
    const batch = [head, ...this.waiting.filter(fits)].slice(0, max);
    const waitedMs = performance.now() - head.arrived;
    if (batch.length < max && !head.submission.alone && waitedMs < this.waitMs) {
      this.timer = setTimeout(() => this.pump(), this.waitMs - waitedMs);
      return;
    }
    this.waiting = this.waiting.filter((w) => !batch.includes(w));
    this.busy = true;
    void this.runBatch(batch).finally(() => {
      this.busy = false;
      this.pump();
    });
  }

  private async runBatch(batch: Array<Waiting<P>>): Promise<void> {
    // What the host may blame for a fall: the submissions whose generations ran together.
    const submissions = new Set(batch.map((w) => w.submission));
    for (const s of submissions) this.events.started(s.id, submissions.size);
    const members = batch.map(({ plan, generation }): Member<P> => ({ plan, options: generation.options, settle: (r) => generation.settle(r) }));
    try {
      await this.pipeline.run(members);
    } catch (error) {
      // The pipeline settles every member itself; this is for one that could not even start.
      for (const m of members) m.settle({ error });
    }
  }
}

function abortError(): Error {
  const err = new Error('generation canceled');
  err.name = 'AbortError';
  return err;
}
