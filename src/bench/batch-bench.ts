import path from 'node:path';
import type { GenerateParams } from '../engine/params.js';
import { writeRandomModel } from '../engine/testmodels/make.js';
import type { RandomModelOptions } from '../engine/testmodels/random-model.js';
import { Engine } from '../engine/thread/engine-host.js';
import { envSchema } from '../config.js';

/**
 * `t2i bench`, sections 4 and 5: what batching and a second session do for a CPU worker.
 *
 * 4. Images per second at batch sizes 1, 2, 4 and 8, each size on its own engine whose batch
 *    fills exactly (no gathering wait), the sizes measured one after another within each round
 *    and compared as ratios to batch 1 of the same round: the machine is shared, so only
 *    figures taken side by side mean anything. Beside them, the CPU time the process spent per
 *    image (all its threads): other tenants slow a run down but hardly change the work it does,
 *    and on a worker whose cores are all busy, images per second is cores / CPU time per image.
 *    The default BATCH_MAX is the smallest batch within 10% of the best by that measure.
 * 5. The same images through one engine using every core, and through two engines of one
 *    thread each side by side (a second session on the same worker), alternately, at the batch
 *    size section 4 chose; judged the same way.
 *
 * The model is shaped like SD 1.5's UNet (four levels, latents 64 to 8 wide at 512x512, channels
 * x1, x2, x4, x4, cross-attention over 77 tokens of 768) with 128 channels at its first level
 * instead of 320, so that a round takes seconds, not hours; the requests are SD 1.5's: 512x512
 * with guidance.
 */

export const BATCH_MODEL: Partial<RandomModelOptions> = { hiddenSize: 768, unetChannels: 128, unetBlocks: 2, unetLevels: 4, vaeChannels: 16 };
const RUN: GenerateParams = { prompt: 'a red circle', width: 512, height: 512, numSteps: 4, guidanceScale: 7.5, scheduler: 'euler' };
const SIZES = [1, 2, 4, 8] as const;
/**
 * A batch size is as good as the best if it reaches this share of the best's images per CPU
 * second. Every job of a batch waits for all of it, so a smaller gain is not worth the wait; and
 * rounds on this shared machine scatter by about as much.
 */
const NEAR_BEST = 0.9;
/** A second session is kept only if it adds at least this much. */
const SECOND_SESSION_GAIN = 1.1;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const f2 = (x: number) => x.toFixed(2);

interface Took {
  /** Wall time, ms. */
  wallMs: number;
  /** CPU time of this process over that time (every thread: the engines' and onnxruntime's), ms. */
  cpuMs: number;
}

/** Generates `count` images on each of `engines` at once (seeds from `seed`). */
async function images(engines: Engine[], count: number, seed = 0): Promise<Took> {
  const cpu = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(engines.flatMap((e, k) => Array.from({ length: count }, (_, i) => e.generate({ ...RUN, seed: seed + k * count + i }))));
  const used = process.cpuUsage(cpu);
  return { wallMs: performance.now() - t0, cpuMs: (used.user + used.system) / 1000 };
}

export async function runBatchBench(out: (line: string) => void, dir: string, rounds: number): Promise<void> {
  const modelDir = path.join(dir, 'batching');
  await writeRandomModel(modelDir, BATCH_MODEL);
  out(
    `\n4. batching: random SD-1.5-shaped model ${JSON.stringify(BATCH_MODEL)}, ${RUN.width}x${RUN.height}, ${RUN.numSteps} steps, guidance ${RUN.guidanceScale}`,
  );
  const batch = await batchSizes(out, modelDir, rounds);
  await secondSession(out, modelDir, rounds, batch);
}

/** Section 4; returns the batch size it would make the default. */
async function batchSizes(out: (line: string) => void, modelDir: string, rounds: number): Promise<number> {
  const engines = new Map<number, Engine>();
  try {
    // A wait longer than any round: each engine's batch leaves exactly when it is full.
    for (const size of SIZES) engines.set(size, await Engine.start({ modelDir, provider: 'cpu', batchMax: size, batchWaitMs: 600_000 }));
    for (const [size, e] of engines) await images([e], size);
    const ips = new Map<number, number[]>(SIZES.map((s) => [s, []]));
    const cpu = new Map<number, number[]>(SIZES.map((s) => [s, []]));
    const wall = new Map<number, number[]>(SIZES.map((s) => [s, []]));
    for (let r = 0; r < rounds; r++) {
      // Rotated each round, so that no size always runs first or last.
      const order = SIZES.map((_, i) => SIZES[(i + r) % SIZES.length]!);
      const took = new Map<number, Took>();
      for (const size of order) took.set(size, await images([engines.get(size)!], size, 100 * r));
      for (const size of SIZES) {
        const t = took.get(size)!;
        ips.get(size)!.push(size / (t.wallMs / 1000) / (1 / (took.get(1)!.wallMs / 1000)));
        cpu.get(size)!.push(t.cpuMs / size);
        wall.get(size)!.push(t.wallMs);
      }
      const line = SIZES.map(
        (s) => `batch ${s} ${f2(s / (took.get(s)!.wallMs / 1000))} img/s (${f2(ips.get(s)!.at(-1)!)}), ${Math.round(cpu.get(s)!.at(-1)!)} ms CPU/img`,
      );
      out(`   round ${r + 1}: ${line.join('  |  ')}`);
    }
    const relIps = new Map(SIZES.map((s) => [s, median(ips.get(s)!)]));
    const cpuPer = new Map(SIZES.map((s) => [s, median(cpu.get(s)!)]));
    // Images per second on busy cores, relative to batch 1: the inverse of CPU time per image.
    const relCpu = new Map(SIZES.map((s) => [s, cpuPer.get(1)! / cpuPer.get(s)!]));
    out(`   images/s relative to batch 1, median of rounds: ${SIZES.map((s) => `batch ${s} ${f2(relIps.get(s)!)}`).join(', ')}`);
    out(
      `   CPU time per image, median: ${SIZES.map((s) => `batch ${s} ${Math.round(cpuPer.get(s)!)} ms (${f2(relCpu.get(s)!)} x the images per CPU second of batch 1)`).join(', ')}`,
    );
    const worst = Math.min(...relCpu.values());
    out(
      `   goal: batching costs no CPU (images per CPU second >= ${NEAR_BEST} x batch 1 at every size, the rounds' scatter): lowest ${f2(worst)} ${worst >= NEAR_BEST ? 'OK' : 'MISSED'}`,
    );
    out(
      `   wall time of a batch (median): ${SIZES.map((s) => `batch ${s} ${(median(wall.get(s)!) / 1000).toFixed(1)} s`).join(', ')}: every job of a batch waits for all of it`,
    );
    const best = Math.max(...relCpu.values());
    const chosen = SIZES.find((s) => relCpu.get(s)! >= NEAR_BEST * best)!;
    const configured = envSchema.shape.BATCH_MAX.parse(undefined);
    out(
      `   default BATCH_MAX = smallest batch within ${Math.round((1 - NEAR_BEST) * 100)}% of the best images per CPU second (${f2(best)}): ${chosen}; src/config.ts says ${configured} ${chosen === configured ? 'OK' : 'DIFFERS'}`,
    );
    return chosen;
  } finally {
    await Promise.all([...engines.values()].map((e) => e.close()));
  }
}

async function secondSession(out: (line: string) => void, modelDir: string, rounds: number, batch: number): Promise<void> {
  // Enough images that each session has work all along: two batches each.
  const each = 2 * batch;
  out(`\n5. a second session on one CPU worker: ${2 * each} images, batches of ${batch}, same model and requests`);
  const one = await Engine.start({ modelDir, provider: 'cpu', batchMax: batch, batchWaitMs: 600_000 });
  const two = [
    await Engine.start({ modelDir, provider: 'cpu', threads: 1, batchMax: batch, batchWaitMs: 600_000 }),
    await Engine.start({ modelDir, provider: 'cpu', threads: 1, batchMax: batch, batchWaitMs: 600_000 }),
  ];
  try {
    await images([one], batch);
    await images(two, batch);
    const wallGain: number[] = [];
    const cpuGain: number[] = [];
    for (let r = 0; r < rounds; r++) {
      const single = await images([one], 2 * each, 100 * r);
      const pair = await images(two, each, 100 * r);
      wallGain.push(single.wallMs / pair.wallMs);
      cpuGain.push(single.cpuMs / pair.cpuMs);
      const per = (t: Took) => `${f2((2 * each) / (t.wallMs / 1000))} img/s, ${Math.round(t.cpuMs / (2 * each))} ms CPU/img`;
      out(`   round ${r + 1}: one session on every core ${per(single)}  |  two sessions of 1 thread ${per(pair)}`);
    }
    const gain = median(cpuGain);
    out(`   two sessions / one, median: images/s ${f2(median(wallGain))}, images per CPU second ${f2(gain)}`);
    out(
      `   kept if images per CPU second >= ${SECOND_SESSION_GAIN} x (it holds the model twice): ${gain >= SECOND_SESSION_GAIN ? 'KEPT: ENGINE_SESSIONS=2 with ORT_THREADS=1 on CPU workers with the memory for it' : 'not kept: one session per worker'}`,
    );
  } finally {
    await Promise.all([one, ...two].map((e) => e.close()));
  }
}
