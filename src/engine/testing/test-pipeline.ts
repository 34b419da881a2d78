import { randomFillSync } from 'node:crypto';
import sharp from 'sharp';
import { resolveParams, SD_DEFAULTS, throwIfAborted, type GenerateOptions, type GenerateParams, type Generation } from '../pipeline.js';

/**
 * A test double for the diffusion pipeline, run in the engine thread exactly where the real one
 * runs (thread/engine-thread.ts), for load, soak and failure tests of everything around the
 * engine: same parameter validation, progress after every "step", cancellation between steps, a
 * real PNG (a flat colour derived from the seed, with one random pixel). Each step waits `stepMs` on a timer, so a job
 * lasts a chosen time without using the CPU. It draws nothing of the prompt.
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
 * thread, so a test can let a restarted engine succeed.
 */

export interface TestPipelineOptions {
  stepMs: number;
}

const DIRECTIVE = /\[test:(crash|hang|oom|fail)(?:@(\d+))?\]/;

export class TestPipeline {
  private generations = 0;

  constructor(private readonly options: TestPipelineOptions) {}

  async generate(params: GenerateParams, options: GenerateOptions = {}): Promise<Generation> {
    const started = performance.now();
    const nth = ++this.generations;
    const p = resolveParams(params, { ...SD_DEFAULTS, scheduler: 'pndm' });
    const m = DIRECTIVE.exec(p.prompt);
    const fault = m && (m[2] === undefined || Number(m[2]) === nth) ? m[1] : undefined;
    for (let step = 1; step <= p.numSteps; step++) {
      throwIfAborted(options.signal);
      if (step === 1) this.misbehave(fault, p.prompt);
      if (this.options.stepMs > 0) await new Promise((r) => setTimeout(r, this.options.stepMs));
      options.onProgress?.({ step, totalSteps: p.numSteps, elapsedMs: performance.now() - started });
    }
    throwIfAborted(options.signal);
    // A small flat image keeps uploads cheap; its colour makes different seeds distinguishable,
    // and a random first pixel makes every generation's bytes its own, so a test can tell which
    // attempt's object a URL serves.
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
