import sharp from 'sharp';
import { resolveParams, SD_DEFAULTS, throwIfAborted, type GenerateParams, type Generation, type Progress } from './pipeline.js';

/**
 * A zero-cost stand-in for the diffusion engine, for load tests, soak tests and failure tests
 * of the queue path (ENGINE=synthetic): same parameters, same validation, progress after every
 * "step", cancellation between steps, and a real PNG (a flat colour derived from the seed).
 * Each step waits `stepMs` on a timer, so a job lasts a chosen time without using the CPU.
 * It makes no pictures of the prompt; never point users at it.
 */

export interface SyntheticEngineOptions {
  stepMs: number;
}

export class SyntheticEngine {
  readonly info = { modelDir: 'synthetic', provider: 'none', defaultScheduler: 'pndm' as const, loadMs: 0, sizeBytes: 0 };
  readonly alive = true;

  constructor(private readonly options: SyntheticEngineOptions) {}

  async generate(params: GenerateParams, run: { onProgress?: (p: Progress) => void; signal?: AbortSignal } = {}): Promise<Generation> {
    const started = performance.now();
    const p = resolveParams(params, { ...SD_DEFAULTS, scheduler: 'pndm' });
    for (let step = 1; step <= p.numSteps; step++) {
      throwIfAborted(run.signal);
      if (this.options.stepMs > 0) await new Promise((r) => setTimeout(r, this.options.stepMs));
      run.onProgress?.({ step, totalSteps: p.numSteps, elapsedMs: performance.now() - started });
    }
    throwIfAborted(run.signal);
    // A small flat image keeps uploads cheap; its colour makes different seeds distinguishable.
    const side = 64;
    const png = await sharp({
      create: { width: side, height: side, channels: 3, background: { r: p.seed & 0xff, g: (p.seed >>> 8) & 0xff, b: (p.seed >>> 16) & 0xff } },
    })
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

  async close(): Promise<void> {}
}
