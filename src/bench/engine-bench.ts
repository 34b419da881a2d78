import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { loadModel, type LoadedModel } from '../engine/model.js';
import { floatTensor, intTensor, timestepTensor } from '../engine/onnx/runtime.js';
import type { Timings } from '../engine/pipeline.js';
import { writeRandomModel } from '../engine/testmodels/make.js';
import type { RandomModelOptions } from '../engine/testmodels/random-model.js';
import { Engine } from '../engine/thread/engine-host.js';
import { runBatchBench } from './batch-bench.js';

/**
 * `t2i bench`: the engine's overhead and memory, measured side by side in one run.
 *
 * 1. Overhead: a compute-heavy random model; the whole generation (thread hop, tokenizer,
 *    schedulers, guidance, PNG) against the same sequence of bare session.run calls, repeated
 *    alternately so both see the same machine load. Goal: ratio <= 1.05.
 * 2. Event loop: the longest stall of the host's event loop while the engine thread generates,
 *    beside the stall of running the same UNet step on the main thread.
 * 3. Memory: peak RSS of a fresh process that loads a weight-heavy model and generates, over
 *    the model's file size. Goal: <= 1.15 x size + 250 MB.
 * 4-5. Batching and a second session (batch-bench.ts).
 */

const COMPUTE_MODEL: Partial<RandomModelOptions> = { hiddenSize: 768, unetChannels: 192, unetBlocks: 5, vaeChannels: 16 };
const COMPUTE_RUN = { width: 512, height: 512, numSteps: 8, guidanceScale: 7.5, seed: 1, scheduler: 'euler' as const };
const MEMORY_MODEL: Partial<RandomModelOptions> = { hiddenSize: 768, unetChannels: 1024, unetBlocks: 6, vaeChannels: 8, externalData: true };
const MEMORY_RUN = { width: 64, height: 64, numSteps: 2, guidanceScale: 7.5, seed: 1, scheduler: 'euler' as const };

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const mb = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MB`;
const s = (ms: number) => `${(ms / 1000).toFixed(3)} s`;

/** The same model calls the pipeline makes, straight on onnxruntime, each run timed. */
async function bareRuns(m: LoadedModel, run: typeof COMPUTE_RUN): Promise<{ totalMs: number; unetStepMs: number; mainThreadStallMs: number }> {
  {
    const h = run.height / 8;
    const w = run.width / 8;
    const ids = m.tokenizer.encode('a red circle').ids;
    const te = m.textEncoder;
    const idsT = intTensor(te.input('input_ids'), ids, [1, ids.length]);
    const hiddenSize = m.unet.input('encoder_hidden_states').shape[2] as number;
    const sample = new Float32Array(2 * 4 * h * w).fill(0.5);
    const ehs = new Float32Array(2 * 77 * hiddenSize).fill(0.1);
    const latents = new Float32Array(4 * h * w).fill(0.5);
    let total = 0;
    const timed = async (f: () => Promise<unknown>) => {
      const t0 = performance.now();
      await f();
      const dt = performance.now() - t0;
      total += dt;
      return dt;
    };
    await timed(() => te.run({ input_ids: idsT }, ['last_hidden_state']));
    await timed(() => te.run({ input_ids: idsT }, ['last_hidden_state']));
    const stall = monitorEventLoopDelay({ resolution: 1 });
    stall.enable();
    const steps: number[] = [];
    for (let i = 0; i < run.numSteps; i++) {
      steps.push(
        await timed(() =>
          m.unet.run(
            {
              sample: floatTensor(m.unet.input('sample'), sample, [2, 4, h, w]),
              timestep: timestepTensor(m.unet.input('timestep'), 999 - i * 100),
              encoder_hidden_states: floatTensor(m.unet.input('encoder_hidden_states'), ehs, [2, 77, hiddenSize]),
            },
            ['out_sample'],
          ),
        ),
      );
    }
    stall.disable();
    await timed(() => m.vaeDecoder.run({ latent_sample: floatTensor(m.vaeDecoder.input('latent_sample'), latents, [1, 4, h, w]) }, ['sample']));
    return { totalMs: total, unetStepMs: median(steps), mainThreadStallMs: stall.max / 1e6 };
  }
}

export async function memoryProbe(modelDir: string): Promise<void> {
  const engine = await Engine.start({ modelDir, provider: 'cpu' });
  await engine.generate({ ...MEMORY_RUN, prompt: 'a red circle' });
  await engine.close();
  const maxRssBytes = peakRssBytes();
  process.stdout.write(`${JSON.stringify({ maxRssBytes, sizeBytes: engine.info.sizeBytes })}\n`);
}

export async function runEngineBench(options: { rounds?: number; threads?: number; skipMemory?: boolean; batchingOnly?: boolean } = {}): Promise<void> {
  const rounds = options.rounds ?? 3;
  const out = (line: string) => process.stdout.write(`${line}\n`);
  const dir = await mkdtemp(path.join(os.tmpdir(), 't2i-bench-'));
  try {
    out(`t2i engine benchmark  (${os.cpus().length} cores, ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version})`);
    if (options.batchingOnly) return await runBatchBench(out, dir, rounds);
    const computeDir = path.join(dir, 'compute');
    await writeRandomModel(computeDir, COMPUTE_MODEL);
    out(
      `\n1. overhead: random model ${JSON.stringify(COMPUTE_MODEL)}, ${COMPUTE_RUN.width}x${COMPUTE_RUN.height}, ${COMPUTE_RUN.numSteps} steps, guidance on (UNet batch 2)`,
    );

    const engine = await Engine.start({ modelDir: computeDir, provider: 'cpu', ...(options.threads ? { threads: options.threads } : {}) });
    const pipelineMs: number[] = [];
    const bareMs: number[] = [];
    const stalls: number[] = [];
    const inRun: number[] = [];
    let mainStall = 0;
    let lastTimings: Timings | undefined;
    let unetStep = 0;
    // Both sides keep their sessions for the whole run, and both are warmed up first: the first
    // runs pay for allocator growth and kernel selection.
    const bareModel = await loadModel(computeDir, { provider: 'cpu', ...(options.threads ? { threads: options.threads } : {}) });
    await engine.generate({ ...COMPUTE_RUN, prompt: 'warm up', numSteps: 2 });
    await bareRuns(bareModel, { ...COMPUTE_RUN, numSteps: 2 });
    for (let r = 0; r < rounds; r++) {
      const bare = await bareRuns(bareModel, COMPUTE_RUN);
      bareMs.push(bare.totalMs);
      mainStall = Math.max(mainStall, bare.mainThreadStallMs);
      unetStep = bare.unetStepMs;
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const t0 = performance.now();
      lastTimings = (await engine.generate({ ...COMPUTE_RUN, prompt: 'a red circle' })).timings;
      pipelineMs.push(performance.now() - t0);
      inRun.push(pipelineMs.at(-1)! / lastTimings.sessionRunMs);
      h.disable();
      stalls.push(h.max / 1e6);
      out(
        `   round ${r + 1}: pipeline ${s(pipelineMs.at(-1)!)} (of which session.run ${s(lastTimings.sessionRunMs)}: ${inRun.at(-1)!.toFixed(3)})` +
          `  |  bare session.run sequence ${s(bare.totalMs)}: ${(pipelineMs.at(-1)! / bare.totalMs).toFixed(3)}`,
      );
    }
    await engine.close();
    await bareModel.release();
    // Two ratios. Within one generation: the host's wall time over the time spent inside
    // session.run for that same generation (immune to load changing between runs). Across runs:
    // the pipeline against the same session.run sequence made directly, back to back.
    const ratio = median(inRun);
    const across = median(pipelineMs.map((p, i) => p / bareMs[i]!));
    out(`   total / session.run, same generation (median): ${ratio.toFixed(3)}  (goal <= 1.05) ${ratio <= 1.05 ? 'OK' : 'OVER'}`);
    out(`   pipeline / bare session.run sequence, back to back (median of rounds): ${across.toFixed(3)}`);
    out(
      `   last pipeline run: encode ${s(lastTimings!.encodeMs)}, denoise ${s(lastTimings!.denoiseMs)}, decode + PNG ${s(lastTimings!.decodeMs)}; inside session.run ${s(lastTimings!.sessionRunMs)}`,
    );
    out(`\n2. event loop: longest stall of the host while the engine thread generates: ${Math.max(...stalls).toFixed(1)} ms`);
    out(`   for comparison, the same UNet run on the main thread stalls it ${mainStall.toFixed(0)} ms (one step ~ ${unetStep.toFixed(0)} ms)`);

    if (!options.skipMemory) {
      const memDir = path.join(dir, 'memory');
      await writeRandomModel(memDir, MEMORY_MODEL);
      out(`\n3. memory: random model ${JSON.stringify(MEMORY_MODEL)}, loaded and run once in a fresh process`);
      const child = spawnSync(process.execPath, [...process.execArgv, process.argv[1]!, 'bench', '--memory-probe', memDir], { encoding: 'utf8' });
      if (child.status !== 0) throw new Error(`memory probe failed: ${child.stderr}`);
      const { maxRssBytes, sizeBytes } = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as { maxRssBytes: number; sizeBytes: number };
      const budget = 1.15 * sizeBytes + 250 * 2 ** 20;
      const baseline = nodeBaselineRss();
      out(
        `   model files ${mb(sizeBytes)}; peak RSS ${mb(maxRssBytes)} = ${(maxRssBytes / sizeBytes).toFixed(2)} x size (bare node + onnxruntime + sharp: ${mb(baseline)})`,
      );
      out(`   budget 1.15 x size + 250 MB = ${mb(budget)} ${maxRssBytes <= budget ? 'OK' : 'OVER'}`);
    }
    await runBatchBench(out, dir, rounds);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * This process's peak RSS. On Linux from VmHWM: getrusage's ru_maxrss survives exec, so a child
 * of a big parent would report the parent's peak.
 */
export function peakRssBytes(): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    // not Linux
  }
  return process.resourceUsage().maxRSS * 1024;
}

function nodeBaselineRss(): number {
  const script =
    "import('onnxruntime-node').then(() => import('sharp')).then(() => console.log(Number(/VmHWM:\\s+(\\d+)/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'))?.[1] ?? process.resourceUsage().maxRSS) * 1024))";
  return Number(execFileSync(process.execPath, ['-e', script], { encoding: 'utf8' }).trim());
}
