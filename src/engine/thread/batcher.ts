import type { GenerateOptions, GenerateParams, Generation } from '../params.js';

/**
 * The engine thread's queue: generations wait here, and the ones that can share UNet runs (the
 * pipeline gives them equal batch keys) leave together, up to the pipeline's batch size. The
 * first in line is never passed over: it leaves with whatever compatible generations are there
 * once the batch is full or it has waited `waitMs`, counted from its arrival (so in a busy
 * engine, where it already waited for the previous batch, it does not wait again). One batch
 * uses the models at a time; the next starts as soon as the previous one's models are idle,
 * while its PNGs are still being encoded.
 */

export interface Planned {
  /** Generations with equal keys may share a UNet run; undefined: this one runs alone. */
  batchKey: string | undefined;
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
  /** Run in a batch of its own (the host suspects it of taking down an engine with others). */
  alone: boolean;
}

export interface BatcherEvents {
  started(id: number, batchSize: number): void;
  progress: (id: number, progress: Parameters<NonNullable<GenerateOptions['onProgress']>>[0]) => void;
  done(id: number, generation: Generation): void;
  failed(id: number, error: unknown): void;
}

interface Waiting<P extends Planned> {
  submission: Submission;
  plan: P;
  arrived: number;
  controller: AbortController;
}

export class Batcher<P extends Planned> {
  private readonly waiting: Array<Waiting<P>> = [];
  /** Every generation not yet settled, waiting or running, by id. */
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
    const controller = new AbortController();
    this.controllers.set(submission.id, controller);
    let plan: P;
    try {
      plan = await this.pipeline.plan(submission.params);
      if (controller.signal.aborted || this.closed) throw abortError();
    } catch (error) {
      this.controllers.delete(submission.id);
      this.events.failed(submission.id, error);
      return;
    }
    this.waiting.push({ submission, plan, arrived: performance.now(), controller });
    this.pump();
  }

  /** A waiting generation leaves the queue at once; a running one stops between steps. */
  cancel(id: number): void {
    this.controllers.get(id)?.abort();
    const at = this.waiting.findIndex((w) => w.submission.id === id);
    if (at >= 0) {
      this.waiting.splice(at, 1);
      this.controllers.delete(id);
      this.events.failed(id, abortError());
    }
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
    const max = head.submission.alone || head.plan.batchKey === undefined ? 1 : this.pipeline.batching.max;
    const batch = [
      head,
      ...this.waiting.filter((w) => w !== head && !w.submission.alone && w.plan.batchKey === head.plan.batchKey && w.plan.batchKey !== undefined),
    ].slice(0, max);
    const waitedMs = performance.now() - head.arrived;
    if (batch.length < max && waitedMs < this.waitMs) {
      this.timer = setTimeout(() => this.pump(), this.waitMs - waitedMs);
      return;
    }
    for (const w of batch) this.waiting.splice(this.waiting.indexOf(w), 1);
    this.busy = true;
    void this.runBatch(batch).finally(() => {
      this.busy = false;
      this.pump();
    });
  }

  private async runBatch(batch: Array<Waiting<P>>): Promise<void> {
    const members = batch.map(({ submission: s, plan, controller }): Member<P> => {
      this.events.started(s.id, batch.length);
      let settled = false;
      return {
        plan,
        options: {
          signal: controller.signal,
          previewEvery: s.previewEvery,
          returnLatents: s.returnLatents,
          onProgress: (progress) => this.events.progress(s.id, progress),
        },
        settle: (result) => {
          if (settled) return;
          settled = true;
          this.controllers.delete(s.id);
          if ('error' in result) this.events.failed(s.id, result.error);
          else this.events.done(s.id, result.generation);
        },
      };
    });
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
