import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { PROVIDERS, type ProviderChoice } from '../engine/onnx/runtime.js';
import type { Progress } from '../engine/pipeline.js';
import { SCHEDULER_NAMES, isSchedulerName, type SchedulerName } from '../engine/schedulers/index.js';
import type { TestVariant } from '../engine/testmodels/make.js';
import type { TimestepInput } from '../engine/testmodels/unet-pieces.js';
import { Engine } from '../engine/thread/engine-host.js';
import { ClipTokenizer } from '../engine/tokenizer.js';

/** The engine's commands: generate, tokenize, make-test-models. */

export class UsageError extends Error {
  override name = 'UsageError';
}

/** Where `t2i` keeps the models it makes when no MODEL_DIR is given. */
export const DEFAULT_MODELS_DIR = path.resolve('.t2i', 'models');

/**
 * The test-model writers, loaded on first use. They build ONNX files with `onnx-proto`, a
 * development dependency: a production install (the Docker images run `npm ci --omit=dev`)
 * starts `t2i api`, `t2i worker` and `t2i migrate` without it, and only the commands that write
 * a test model need it.
 */
export async function loadTestModels(): Promise<typeof import('../engine/testmodels/make.js')> {
  try {
    return await import('../engine/testmodels/make.js');
  } catch (err) {
    const e = err as { code?: unknown; message?: unknown };
    if (e.code === 'ERR_MODULE_NOT_FOUND' && String(e.message).includes('onnx-proto')) {
      throw new UsageError(
        'test models are built with the onnx-proto package, a development dependency this install lacks: install the dev dependencies (`npm ci`), or give --model (or MODEL_DIR) a Stable Diffusion ONNX export',
      );
    }
    throw err;
  }
}

/**
 * The model to use: --model, else MODEL_DIR, else the oracle test model, which is written on
 * first use so that a fresh checkout can make pictures at once. The fallback is said every
 * time (`doing`: "drawing with", "tokenizing with"): the oracle draws coloured shapes from a
 * few words, and someone who forgot MODEL_DIR must not mistake its pictures for a real model's.
 */
export async function resolveModelDir(flag: string | undefined, log: (msg: string) => void, doing: string): Promise<string> {
  const chosen = flag ?? process.env.MODEL_DIR;
  if (chosen) return path.resolve(chosen);
  const oracle = path.join(DEFAULT_MODELS_DIR, 'oracle');
  log(
    `no --model or MODEL_DIR given: ${doing} the oracle test model (${oracle}), which draws simple shapes from a few words; point --model or MODEL_DIR at a Stable Diffusion ONNX export for real pictures`,
  );
  if (!existsSync(path.join(oracle, 'model_index.json'))) {
    log(`writing the oracle test model to ${oracle}`);
    await (await loadTestModels()).writeOracleModel(oracle);
  }
  return oracle;
}

function int(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^-?\d+$/.test(value)) throw new UsageError(`--${name} must be an integer, got "${value}"`);
  return Number(value);
}

function num(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got "${value}"`);
  return n;
}

function provider(value: string | undefined): ProviderChoice | undefined {
  if (value === undefined) return undefined;
  if (!(PROVIDERS as readonly string[]).includes(value)) throw new UsageError(`--provider must be one of ${PROVIDERS.join(', ')}, got "${value}"`);
  return value as ProviderChoice;
}

function scheduler(value: string | undefined): SchedulerName | undefined {
  if (value === undefined) return undefined;
  if (!isSchedulerName(value)) throw new UsageError(`--scheduler must be one of ${SCHEDULER_NAMES.join(', ')}, got "${value}"`);
  return value;
}

async function inputFile(name: string, file: string | undefined): Promise<Uint8Array | undefined> {
  if (file === undefined) return undefined;
  try {
    return await readFile(path.resolve(file));
  } catch (err) {
    throw new UsageError(`--${name}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

const ms = (v: number) => `${(v / 1000).toFixed(2)} s`;

function progressBar(p: Progress, out: NodeJS.WriteStream): void {
  const width = 30;
  const done = Math.round((p.step / p.totalSteps) * width);
  const line = `[${'#'.repeat(done)}${'.'.repeat(width - done)}] step ${p.step}/${p.totalSteps} ${ms(p.elapsedMs)}`;
  if (out.isTTY) out.write(`\r${line}${p.step === p.totalSteps ? '\n' : ''}`);
  else if (p.step === p.totalSteps || p.step % 10 === 0 || p.step === 1) out.write(`${line}\n`);
}

export async function generateCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      negative: { type: 'string' },
      steps: { type: 'string' },
      guidance: { type: 'string' },
      seed: { type: 'string' },
      scheduler: { type: 'string' },
      width: { type: 'string' },
      height: { type: 'string' },
      model: { type: 'string' },
      provider: { type: 'string' },
      threads: { type: 'string' },
      image: { type: 'string' },
      mask: { type: 'string' },
      strength: { type: 'string' },
      output: { type: 'string', short: 'o' },
    },
  });
  const prompt = positionals.join(' ');
  if (!prompt)
    throw new UsageError(
      'usage: t2i generate "prompt" [--negative TEXT] [--steps N] [--guidance G] [--seed S] [--scheduler NAME] [--width W] [--height H] [--image IN.png [--mask MASK.png] [--strength S]] [--model DIR] [--provider auto|cuda|coreml|cpu] [-o out.png]',
    );
  const err = process.stderr;
  const log = (msg: string) => err.write(`${msg}\n`);
  const modelDir = await resolveModelDir(values.model, log, 'drawing with');
  const threads = int('threads', values.threads);
  const providerChoice = provider(values.provider);
  const params = {
    prompt,
    negativePrompt: values.negative ?? null,
    numSteps: int('steps', values.steps),
    guidanceScale: num('guidance', values.guidance),
    seed: int('seed', values.seed),
    width: int('width', values.width),
    height: int('height', values.height),
    scheduler: scheduler(values.scheduler),
    image: await inputFile('image', values.image),
    mask: await inputFile('mask', values.mask),
    strength: num('strength', values.strength),
  };

  const loadStart = performance.now();
  const engine = await Engine.start({
    modelDir,
    ...(providerChoice ? { provider: providerChoice } : {}),
    ...(threads ? { threads } : {}),
    log: (level, msg) => log(`${level}: ${msg}`),
  });
  try {
    const loadMs = performance.now() - loadStart;
    const clean = Object.fromEntries(Object.entries(params).filter(([, v]) => v !== undefined)) as typeof params;
    const g = await engine.generate(clean, { onProgress: (p) => progressBar(p, err) });
    const out = path.resolve(values.output ?? 'output.png');
    await writeFile(out, g.png);
    const strength = g.strength === undefined ? '' : `, strength ${g.strength}`;
    log(
      `model ${modelDir} (${engine.info.variant ?? 'unknown variant'}) on ${engine.info.provider}; scheduler ${g.scheduler}, ${g.numSteps} steps, guidance ${g.guidanceScale}, seed ${g.seed}, ${g.width}x${g.height}${strength}`,
    );
    log(
      `load ${ms(loadMs)} | encode ${ms(g.timings.encodeMs)} | denoise ${ms(g.timings.denoiseMs)} | decode ${ms(g.timings.decodeMs)} | total ${ms(g.timings.totalMs)}`,
    );
    process.stdout.write(`${out}\n`);
  } finally {
    await engine.close();
  }
}

export async function tokenizeCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { model: { type: 'string' } } });
  const modelDir = await resolveModelDir(values.model, (m) => process.stderr.write(`${m}\n`), 'tokenizing with');
  const tokenizer = await ClipTokenizer.fromDirectory(path.join(modelDir, 'tokenizer'));
  const enc = tokenizer.encode(positionals.join(' '));
  const ids = Array.from(enc.ids.subarray(0, enc.attentionLength));
  process.stdout.write(`${ids.join(' ')}\n`);
  process.stdout.write(`${enc.attentionLength} tokens (with start and end), padded to ${tokenizer.modelMaxLength} with ${tokenizer.padId}\n`);
  if (enc.truncated) process.stdout.write(`truncated: ${enc.droppedTokens} tokens dropped: "${enc.droppedText}"\n`);
}

export async function makeTestModelsCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      kind: { type: 'string', default: 'all' },
      variant: { type: 'string', default: 'sd' },
      fp16: { type: 'boolean', default: false },
      timestep: { type: 'string' },
      'timestep-rank': { type: 'string' },
      ids: { type: 'string' },
      hidden: { type: 'string' },
      channels: { type: 'string' },
      blocks: { type: 'string' },
      'external-data': { type: 'boolean', default: false },
    },
  });
  const { TEST_VARIANTS, writeOracleModel, writeRandomModel } = await loadTestModels();
  const dir = positionals[0];
  if (!dir)
    throw new UsageError(
      `usage: t2i make-test-models DIR [--kind all|oracle|random] [--variant ${TEST_VARIANTS.join('|')}|all] [--fp16] [--timestep int64|float32|float16] [--timestep-rank 0|1] [--ids int32|int64] [--hidden N] [--channels N] [--blocks N] [--external-data]`,
    );
  const variants = values.variant === 'all' ? [...TEST_VARIANTS] : [values.variant as TestVariant];
  if (!variants.every((v) => (TEST_VARIANTS as readonly string[]).includes(v))) {
    throw new UsageError(`--variant must be one of ${TEST_VARIANTS.join(', ')} or all, got "${values.variant}"`);
  }
  const kind = values.kind;
  if (!['all', 'oracle', 'random'].includes(kind)) throw new UsageError(`--kind must be all, oracle or random, got "${kind}"`);
  const timestepType = values.timestep;
  if (timestepType && !['int64', 'float32', 'float16'].includes(timestepType)) throw new UsageError(`--timestep must be int64, float32 or float16`);
  const rank = int('timestep-rank', values['timestep-rank']);
  if (rank !== undefined && rank !== 0 && rank !== 1) throw new UsageError('--timestep-rank must be 0 or 1');
  const ids = values.ids;
  if (ids && ids !== 'int32' && ids !== 'int64') throw new UsageError('--ids must be int32 or int64');
  const timestep: TimestepInput | undefined =
    timestepType || rank !== undefined ? { type: (timestepType ?? 'int64') as 'int64' | 'float32' | 'float16', rank: rank ?? 1 } : undefined;

  const hidden = int('hidden', values.hidden);
  const channels = int('channels', values.channels);
  const blocks = int('blocks', values.blocks);
  for (const variant of variants) {
    // SD 1.5's models keep their short names; the others are named after their variant.
    const name = (k: string) => path.resolve(dir, variant === 'sd' ? k : `${k}-${variant}`);
    if (kind === 'all' || kind === 'oracle') {
      await writeOracleModel(name('oracle'), { variant, ...(timestep ? { timestep } : {}), ...(ids ? { idsType: ids as 'int32' | 'int64' } : {}) });
      process.stdout.write(`${name('oracle')}\n`);
    }
    if (kind === 'all' || kind === 'random') {
      await writeRandomModel(name('random'), {
        variant,
        fp16: values.fp16,
        externalData: values['external-data'],
        ...(timestep ? { timestep } : {}),
        ...(ids ? { idsType: ids as 'int32' | 'int64' } : {}),
        ...(hidden ? { hiddenSize: hidden } : {}),
        ...(channels ? { unetChannels: channels } : {}),
        ...(blocks ? { unetBlocks: blocks } : {}),
      });
      process.stdout.write(`${name('random')}\n`);
    }
  }
}
