import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../../src/engine/model.js';
import { availableProviders } from '../../src/engine/onnx/runtime.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { writeOracleModel, writeRandomModel } from '../../src/engine/testmodels/make.js';
import type { RandomModelOptions } from '../../src/engine/testmodels/random-model.js';
import { Engine } from '../../src/engine/thread/engine-host.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-models-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

// Euler with 5 steps: timesteps 999, 749.25, 499.5, 249.75, 0 (fractional ones on purpose).
const RUN: GenerateParams = { prompt: 'a red circle', seed: 11, scheduler: 'euler', numSteps: 5, width: 64, height: 64 };

async function generateWith(options: Partial<RandomModelOptions>, name: string, params: GenerateParams = RUN) {
  const modelDir = path.join(dir, name);
  await writeRandomModel(modelDir, options);
  const model = await loadModel(modelDir, { provider: 'cpu' });
  try {
    return { model, generation: await new StableDiffusionPipeline(model).generate(params) };
  } finally {
    await model.release();
  }
}

async function raw(png: Buffer): Promise<Buffer> {
  return sharp(png).raw().toBuffer();
}

describe('exports differ: dtypes and ranks are read from the model', () => {
  let reference: Buffer;
  beforeAll(async () => {
    reference = await raw((await generateWith({}, 'reference')).generation.png);
  });

  // The reference export has int32 input_ids and an int64 timestep of shape [1]. Integer
  // timestep inputs get Euler's fractional timesteps truncated (as numpy does in diffusers), so
  // only exports with a float timestep see different values and make a different picture.
  const variants: Array<[string, Partial<RandomModelOptions>, 'same' | 'different']> = [
    ['int64 input_ids', { idsType: 'int64' }, 'same'],
    ['int64 scalar timestep', { timestep: { type: 'int64', rank: 0 } }, 'same'],
    ['weights in model.onnx_data beside model.onnx', { externalData: true }, 'same'],
    ['float32 timestep of shape [1]', { timestep: { type: 'float32', rank: 1 } }, 'different'],
    ['float16 timestep', { timestep: { type: 'float16', rank: 1 } }, 'different'],
  ];
  for (const [label, options, expected] of variants) {
    it(`${label}: loads and gives the ${expected} picture as the reference export`, async () => {
      const { model, generation } = await generateWith(options, label.replace(/\W+/g, '-'));
      if (options.idsType) expect(model.textEncoder.input('input_ids').type).toBe(options.idsType);
      if (options.timestep) {
        const t = model.unet.input('timestep');
        expect([t.type, t.shape.length]).toEqual([options.timestep.type, options.timestep.rank]);
      }
      const img = await raw(generation.png);
      expect(img.equals(reference)).toBe(expected === 'same');
    });
  }

  it('an fp16 export (float16 inputs and outputs) gives the fp32 picture within half precision', async () => {
    const { model, generation } = await generateWith({ fp16: true }, 'fp16');
    expect(model.unet.input('sample').type).toBe('float16');
    expect(model.unet.input('encoder_hidden_states').type).toBe('float16');
    const img = await raw(generation.png);
    let diff = 0;
    for (let i = 0; i < img.length; i++) diff += Math.abs(img[i]! - reference[i]!);
    expect(diff / img.length).toBeLessThan(2);
    expect(img.equals(Buffer.alloc(img.length))).toBe(false);
  });

  it('is deterministic per seed on a random model, and seeds matter', async () => {
    const a = await generateWith({}, 'det', { ...RUN, scheduler: 'dpmpp_2m' });
    const b = await generateWith({}, 'det', { ...RUN, scheduler: 'dpmpp_2m' });
    const c = await generateWith({}, 'det', { ...RUN, scheduler: 'dpmpp_2m', seed: 12 });
    expect(Buffer.compare(a.generation.png, b.generation.png)).toBe(0);
    expect(Buffer.compare(a.generation.png, c.generation.png)).not.toBe(0);
  });
});

describe('model directory errors name the file and what was expected', () => {
  let good: string;
  beforeAll(async () => {
    good = path.join(dir, 'good');
    await writeOracleModel(good);
  });

  async function broken(name: string, mutate: (d: string) => Promise<void>): Promise<string> {
    const d = path.join(dir, `broken-${name}`);
    await cp(good, d, { recursive: true });
    await mutate(d);
    return d;
  }

  it('a missing directory', async () => {
    await expect(loadModel(path.join(dir, 'nope'))).rejects.toThrow(/nope: model directory not found/);
  });

  it('a missing model_index.json', async () => {
    const d = await broken('index', (d) => rm(path.join(d, 'model_index.json')));
    await expect(loadModel(d)).rejects.toThrow(/model_index\.json: file not found \(expected a diffusers model index/);
  });

  it('a malformed scheduler_config.json', async () => {
    const d = await broken('sched', (d) => writeFile(path.join(d, 'scheduler', 'scheduler_config.json'), '{"beta_start": '));
    await expect(loadModel(d)).rejects.toThrow(/scheduler_config\.json: not valid JSON .*expected a diffusers scheduler config/);
  });

  it('a missing unet/model.onnx', async () => {
    const d = await broken('unet', (d) => rm(path.join(d, 'unet', 'model.onnx')));
    await expect(loadModel(d)).rejects.toThrow(/unet[/\\]model\.onnx: file not found \(expected the unet ONNX model\)/);
  });

  it('a corrupt ONNX file', async () => {
    const d = await broken('corrupt', (d) => writeFile(path.join(d, 'vae_decoder', 'model.onnx'), 'not a model'));
    await expect(loadModel(d, { provider: 'cpu' })).rejects.toThrow(/vae_decoder[/\\]model\.onnx: onnxruntime could not load it with the cpu provider/);
  });

  it('a tokenizer vocab.json that is not an object', async () => {
    const d = await broken('vocab', (d) => writeFile(path.join(d, 'tokenizer', 'vocab.json'), '[1, 2]'));
    await expect(loadModel(d)).rejects.toThrow(/vocab\.json/);
  });

  it('a UNet wired to the wrong inputs', async () => {
    const d = await broken('swap', async (d) => {
      // The text encoder in the UNet's place: no `sample` input.
      await writeFile(path.join(d, 'unet', 'model.onnx'), await readFile(path.join(d, 'text_encoder', 'model.onnx')));
    });
    await expect(loadModel(d, { provider: 'cpu' })).rejects.toThrow(/unet[/\\]model\.onnx: expected an input named "sample", found input_ids/);
  });
});

describe('execution providers', () => {
  it('auto settles on an available provider and says which', async () => {
    const logs: string[] = [];
    const model = await loadModel(path.join(dir, 'good'), { provider: 'auto', log: (m) => logs.push(m) });
    await model.release();
    expect(availableProviders()).toContain(model.provider);
    expect(logs.join('\n')).toContain(`execution provider: ${model.provider} (asked for auto)`);
  });

  it('asking for one that is not installed fails with the list of available ones', async () => {
    const missing = ['cuda', 'coreml'].find((p) => !availableProviders().includes(p as 'cuda'));
    expect(missing).toBeDefined();
    await expect(loadModel(path.join(dir, 'good'), { provider: missing as 'cuda' })).rejects.toThrow(
      new RegExp(`execution provider "${missing}" is not available here; available: ${availableProviders().join(', ')}`),
    );
  });
});

describe('engine thread', () => {
  it('generates off the main thread: the host event loop keeps turning during inference', async () => {
    const modelDir = path.join(dir, 'heavy');
    await writeRandomModel(modelDir, { hiddenSize: 128, unetChannels: 96, unetBlocks: 2 });
    const engine = await Engine.start({ modelDir, provider: 'cpu' });
    try {
      let ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      const steps: number[] = [];
      const g = await engine.generate({ ...RUN, numSteps: 6, width: 256, height: 256 }, { onProgress: () => steps.push(ticks) });
      clearInterval(timer);
      expect(g.png.subarray(1, 4).toString()).toBe('PNG');
      // Timers fired between every pair of steps: nothing held the host's loop for a whole step.
      for (let i = 1; i < steps.length; i++) expect(steps[i]!).toBeGreaterThan(steps[i - 1]!);
    } finally {
      await engine.close();
    }
  });

  it('runs queued generations one at a time, reports progress and cancels on abort', async () => {
    const engine = await Engine.start({ modelDir: path.join(dir, 'good'), provider: 'cpu' });
    try {
      expect(engine.info).toMatchObject({ provider: 'cpu', defaultScheduler: 'pndm' });
      const controller = new AbortController();
      const progress: number[] = [];
      const first = engine.generate(
        { ...RUN, numSteps: 40 },
        {
          signal: controller.signal,
          onProgress: (p) => {
            progress.push(p.step);
            if (p.step === 2) controller.abort();
          },
        },
      );
      const second = engine.generate({ ...RUN, prompt: 'a blue square' });
      await expect(first).rejects.toMatchObject({ name: 'AbortError' });
      expect(progress.at(-1)).toBeLessThan(40);
      const g = await second;
      expect(g.seed).toBe(11);
      await expect(engine.generate({ ...RUN, width: 100 })).rejects.toThrow(/divisible by 8/);
    } finally {
      await engine.close();
    }
    await expect(engine.generate(RUN)).rejects.toThrow(/engine is closed/);
  });

  it('fails to start with the loader message when the model is broken', async () => {
    await expect(Engine.start({ modelDir: path.join(dir, 'nope') })).rejects.toThrow(/model directory not found/);
  });
});
