import { randomFillSync } from 'node:crypto';
import sharp from 'sharp';
import { resolveParams, SD_DEFAULTS, throwIfAborted, type GenerateParams, type Generation, type ResolvedParams } from '../pipeline.js';
import type { Preview } from '../preview.js';
import type { Member } from '../thread/batcher.js';

/**
 * A test double for the diffusion pipeline, run in the engine thread exactly where the real one
 * runs (thread/engine-thread.ts), for load, soak and failure tests of everything around the
 * engine: same parameter validation, progress after every "step", cancellation between steps, a
 * real PNG (a flat colour derived from the seed, with one random pixel), latent previews when asked
 * (the same flat colour, brightening step by step). Each step waits `stepMs` on a timer, so a job
 * lasts a chosen time without using the CPU. It draws nothing of the prompt.
 *
 * It batches as the real pipeline does: generations with the same number of steps share each
 * step's wait (up to `batchMax`), each with its own progress, cancellation and failure; a request
 * for several images is several generations, seeds seed + k, as there (several-images.ts).
 *
 * It is selected only by `t2i worker --test-engine` (and the demo and benchmarks), never by
 * configuration, so a production worker cannot run it by accident.
 *
 * Failure directives, for tests of what the service does when the engine misbehaves: a prompt
 * containing one of these makes the double
 *   [test:crash]  end its thread (process.exit inside a worker thread), as a native crash would;
 *   [test:hang]   block its thread in a busy loop at the first step, as a hung kernel would;
 *   [test:oom]    fail a real allocation (an 8 TiB ArrayBuffer), as an exhausted heap would;
 *   [test:fail]   throw an ordinary error from the model (quoting the prompt, as engine errors may).
 * A directive followed by `@N` (e.g. `[test:crash@2]`) acts only on the Nth generation of this
 * thread (each image of a request counts), so a test can let a restarted engine succeed. Crash
 * and hang take the whole batch down with them, as a real one would; oom and fail end only their
 * own generation (and with it its request).
 */

export interface TestPipelineOptions {
  stepMs: number;
  /** Generations per shared step; 1 (the default) runs them one at a time. */
  batchMax?: number;
}

interface TestPlan {
  p: ResolvedParams;
  batchKey: string | undefined;
}

const DIRECTIVE = /\[test:(crash|hang|oom|fail)(?:@(\d+))?\]/;

export class TestPipeline {
  private generations = 0;
  readonly batching: { max: number };

  constructor(private readonly options: TestPipelineOptions) {
    this.batching = { max: Math.max(1, options.batchMax ?? 1) };
  }

  plan(params: GenerateParams): Promise<TestPlan> {
    const p = resolveParams(params, { ...SD_DEFAULTS, scheduler: 'pndm' });
    return Promise.resolve({ p, batchKey: this.batching.max > 1 ? String(p.numSteps) : undefined });
  }

  async run(members: ReadonlyArray<Member<TestPlan>>): Promise<void> {
    const started = performance.now();
    const jobs = members.map((m) => {
      const nth = ++this.generations;
      const d = DIRECTIVE.exec(m.plan.p.prompt);
      return { m, fault: d && (d[2] === undefined || Number(d[2]) === nth) ? d[1] : undefined };
    });
    const steps = members[0]?.plan.p.numSteps ?? 0;
    let active = jobs;
    // As the real pipeline reports it: the most generations that shared a step.
    let batchSize = 0;
    for (let step = 1; step <= steps && active.length > 0; step++) {
      active = active.filter((j) => {
        try {
          throwIfAborted(j.m.options.signal);
          if (step === 1) this.misbehave(j.fault, j.m.plan.p.prompt);
          return true;
        } catch (error) {
          j.m.settle({ error });
          return false;
        }
      });
      batchSize = Math.max(batchSize, active.length);
      if (this.options.stepMs > 0) await new Promise((r) => setTimeout(r, this.options.stepMs));
      for (const { m } of active) {
        const { p } = m.plan;
        const every = m.options.previewEvery ?? 0;
        const wantPreview = every > 0 && (step % every === 0 || step === steps);
        m.options.onProgress?.({
          step,
          totalSteps: steps,
          elapsedMs: performance.now() - started,
          ...(wantPreview ? { preview: flatPreview(p.width / 8, p.height / 8, p.seed, step / steps) } : {}),
        });
      }
    }
    for (const { m } of active) {
      try {
        throwIfAborted(m.options.signal);
        m.settle({ generation: await this.picture(m.plan.p, started, batchSize) });
      } catch (error) {
        m.settle({ error });
      }
    }
  }

  /**
   * A small flat image keeps uploads cheap; its colour makes different seeds distinguishable,
   * and a random first pixel makes every generation's bytes its own, so a test can tell which
   * attempt's object a URL serves.
   */
  private async picture(p: ResolvedParams, started: number, batchSize: number): Promise<Generation> {
    const side = 64;
    const rgb = Buffer.alloc(side * side * 3);
    for (let i = 0; i < rgb.length; i += 3) rgb.set([p.seed & 0xff, (p.seed >>> 8) & 0xff, (p.seed >>> 16) & 0xff], i);
    randomFillSync(rgb, 0, 3);
    const png = await sharp(rgb, { raw: { width: side, height: side, channels: 3 } })
      .png()
      .toBuffer();
    const totalMs = performance.now() - started;
    return {
      png,
      seed: p.seed,
      width: side,
      height: side,
      numSteps: p.numSteps,
      guidanceScale: p.guidanceScale,
      scheduler: p.scheduler,
      timings: { encodeMs: 0, denoiseMs: totalMs, decodeMs: 0, totalMs, sessionRunMs: 0 },
      warnings: [],
      batchSize,
    };
  }

  private misbehave(fault: string | undefined, prompt: string): void {
    switch (fault) {
      case 'crash':
        process.exit(70);
        break;
      case 'hang':
        // Synchronous on purpose: the thread cannot answer or report anything until terminated.
        for (;;);
      case 'oom':
        // A real failed allocation (8 TiB), not a made-up message.
        new Uint8Array(new ArrayBuffer(2 ** 43)).fill(1);
        break;
      case 'fail':
        // Quotes the prompt, as real engine errors sometimes quote user text: reports must blank it.
        throw new Error(`the test engine failed as asked while generating "${prompt}"`);
    }
  }
}

/** A latent-sized preview of the double's flat colour, faded in by `done` (0..1). */
function flatPreview(width: number, height: number, seed: number, done: number): Preview {
  const rgb = new Uint8Array(width * height * 3);
  const colour = [seed & 0xff, (seed >>> 8) & 0xff, (seed >>> 16) & 0xff].map((c) => Math.round(c * done));
  for (let i = 0; i < rgb.length; i += 3) rgb.set(colour, i);
  return { width, height, rgb };
}
