import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inspectModel } from '../../src/engine/model-inspect.js';
import { loadModel } from '../../src/engine/model.js';
import { availableProviders } from '../../src/engine/onnx/runtime.js';
import { GraphBuilder } from '../../src/engine/testmodels/onnx-builder.js';
import { StableDiffusionPipeline, type GenerateParams } from '../../src/engine/pipeline.js';
import { TEST_VARIANTS, writeOracleModel, writeRandomModel, type RandomModelRequest } from '../../src/engine/testmodels/make.js';
import { Engine } from '../../src/engine/thread/engine-host.js';

let dir: string;
/** The SD oracle model, which several describes use. */
let good: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-models-'));
  good = path.join(dir, 'good');
  await writeOracleModel(good);
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

// Euler with 5 steps: timesteps 999, 749.25, 499.5, 249.75, 0 (fractional ones on purpose).
const RUN: GenerateParams = { prompt: 'a red circle', seed: 11, scheduler: 'euler', numSteps: 5, width: 64, height: 64 };

async function generateWith(options: RandomModelRequest, name: string, params: GenerateParams = RUN) {
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
  const variants: Array<[string, RandomModelRequest, 'same' | 'different']> = [
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

/** Share of channel values at 0 or 255: what an image comparison cannot see into. */
function clippedFraction(img: Buffer): number {
  let clipped = 0;
  for (const v of img) if (v === 0 || v === 255) clipped++;
  return clipped / img.length;
}

describe('random-weight models are scaled like real ones, for every variant', () => {
  const inputs = async (variant: string): Promise<Partial<GenerateParams>> => {
    if (variant !== 'inpaint') return {};
    const picture = (rgb: [number, number, number]) =>
      sharp({ create: { width: 64, height: 64, channels: 3, background: { r: rgb[0], g: rgb[1], b: rgb[2] } } })
        .png()
        .toBuffer();
    return { image: await picture([30, 90, 200]), mask: await picture([255, 255, 255]) };
  };
  for (const variant of TEST_VARIANTS) {
    it(`${variant}: loads as its variant, is deterministic per seed, and decodes to mostly unclipped pixels`, async () => {
      const params = { ...RUN, scheduler: undefined, numSteps: 4, ...(await inputs(variant)) };
      const first = await generateWith({ variant }, `random-${variant}`, params);
      const again = await generateWith({ variant }, `random-${variant}`, params);
      const other = await generateWith({ variant }, `random-${variant}`, { ...params, seed: 12 });
      expect(first.model.variant.name).toMatch(
        { sd: /^SD 1/, 'sd2-v': /^SD 2\.x v-prediction$/, inpaint: /inpainting$/, lcm: /LCM$/, sdxl: /^SDXL$/, 'sdxl-turbo': /^SDXL Turbo$/ }[variant],
      );
      expect(Buffer.compare(first.generation.png, again.generation.png)).toBe(0);
      expect(Buffer.compare(first.generation.png, other.generation.png)).not.toBe(0);
      // Real models clip a few highlights; a model whose pixels are mostly 0 or 255 hides every error.
      expect(clippedFraction(await raw(first.generation.png))).toBeLessThan(0.05);
    });
  }

  it('an fp16 SDXL export (float16 text_embeds and time_ids too) gives the fp32 picture within half precision', async () => {
    const fp32 = await generateWith({ variant: 'sdxl' }, 'sdxl-fp32');
    const fp16 = await generateWith({ variant: 'sdxl', fp16: true }, 'sdxl-fp16');
    expect(['text_embeds', 'time_ids'].map((n) => fp16.model.unet.input(n).type)).toEqual(['float16', 'float16']);
    const [a, b] = [await raw(fp32.generation.png), await raw(fp16.generation.png)];
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff += Math.abs(a[i]! - b[i]!);
    expect(diff / a.length).toBeLessThan(2);
  });

  it('noise predictions and latents are of order 1 (guidance 9, Euler)', async () => {
    const modelDir = path.join(dir, 'scale');
    await writeRandomModel(modelDir);
    const model = await loadModel(modelDir, { provider: 'cpu' });
    try {
      const g = await new StableDiffusionPipeline(model).generate(RUN, { returnLatents: true });
      const rms = Math.sqrt(g.latents!.reduce((s, v) => s + v * v, 0) / g.latents!.length);
      expect(rms).toBeGreaterThan(0.3);
      expect(rms).toBeLessThan(3);
      expect(clippedFraction(await raw(g.png))).toBeLessThan(0.05);
    } finally {
      await model.release();
    }
  });

  it('a float16 SDXL VAE that overflows fails with a clear error instead of a black picture', async () => {
    const logs: string[] = [];
    const modelDir = path.join(dir, 'fp16-vae');
    await writeRandomModel(modelDir, { variant: 'sdxl', fp16: true, vaeOverflow: true });
    const model = await loadModel(modelDir, { provider: 'cpu', log: (m) => logs.push(m) });
    try {
      expect(logs.join('\n')).toMatch(/warning: .*vae_decoder[/\\]model\.onnx runs in float16 .*SDXL's VAE overflows in half precision/);
      await expect(new StableDiffusionPipeline(model).generate(RUN)).rejects.toThrow(
        /vae_decoder[/\\]model\.onnx: the VAE decoder returned \d+ NaN or infinite values of 12288: it runs in half precision and overflowed .*madebyollin\/sdxl-vae-fp16-fix/,
      );
    } finally {
      await model.release();
    }
  });
});

describe('model directory errors name the file and what was expected', () => {
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

describe('directories this engine cannot run say why', () => {
  const editJson = async (file: string, edit: (j: Record<string, unknown>) => void) => {
    const j = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    edit(j);
    await writeFile(file, JSON.stringify(j));
  };
  async function variantOf(name: string, variant: 'sd' | 'sdxl' | 'inpaint', mutate: (d: string) => Promise<void>): Promise<string> {
    const d = path.join(dir, `rejected-${name}`);
    await writeOracleModel(d, { variant });
    await mutate(d);
    return d;
  }
  const cases: Array<[string, 'sd' | 'sdxl' | 'inpaint', (d: string) => Promise<void>, RegExp]> = [
    [
      'an SDXL UNet without text_encoder_2/',
      'sdxl',
      (d) => rm(path.join(d, 'text_encoder_2'), { recursive: true }),
      /unet[/\\]model\.onnx takes text_embeds and time_ids \(SDXL\) but text_encoder_2\/model\.onnx is missing/,
    ],
    [
      'a second text encoder beside an SD UNet',
      'sd',
      async (d) => {
        await cp(path.join(d, 'text_encoder'), path.join(d, 'text_encoder_2'), { recursive: true });
        await cp(path.join(d, 'tokenizer'), path.join(d, 'tokenizer_2'), { recursive: true });
      },
      /text_encoder_2\/ is there but .*unet[/\\]model\.onnx does not take text_embeds and time_ids/,
    ],
    [
      'an SDXL refiner',
      'sdxl',
      (d) => editJson(path.join(d, 'model_index.json'), (j) => (j.requires_aesthetics_score = true)),
      /an SDXL refiner .* is not supported; use an SDXL base or Turbo export/,
    ],
    [
      'an SDXL text encoder without hidden_states outputs',
      'sdxl',
      async (d) => {
        const sd = path.join(good, 'text_encoder', 'model.onnx');
        await writeFile(path.join(d, 'text_encoder_2', 'model.onnx'), await readFile(sd));
      },
      /text_encoder_2[/\\]model\.onnx: SDXL takes the penultimate hidden state, and this text encoder has no hidden_states\.N outputs/,
    ],
    [
      'another architecture named in model_index.json',
      'sd',
      (d) => editJson(path.join(d, 'model_index.json'), (j) => (j._class_name = 'StableDiffusion3Pipeline')),
      /model_index\.json names StableDiffusion3Pipeline; this engine runs Stable Diffusion 1\.x, 2\.x and SDXL/,
    ],
    [
      'a diffusion transformer',
      'sd',
      async (d) => {
        await rm(path.join(d, 'unet'), { recursive: true });
        await cp(path.join(d, 'text_encoder'), path.join(d, 'transformer'), { recursive: true });
      },
      /has a transformer\/ and no unet\/: a diffusion-transformer model/,
    ],
    [
      'an inpainting model without its VAE encoder',
      'inpaint',
      (d) => rm(path.join(d, 'vae_encoder'), { recursive: true }),
      /an inpainting model needs vae_encoder\/model\.onnx to encode the masked image/,
    ],
  ];
  for (const [label, variant, mutate, message] of cases) {
    it(label, async () => {
      await expect(loadModel(await variantOf(label.replace(/\W+/g, '-'), variant, mutate), { provider: 'cpu' })).rejects.toThrow(message);
    });
  }

  it('a UNet with inputs nobody feeds (a ControlNet export)', async () => {
    const d = await variantOf('controlnet', 'sd', async (d) => {
      const g = new GraphBuilder('controlnet_unet');
      const sample = g.input('sample', 'float32', ['batch', 4, 'h', 'w']);
      g.input('timestep', 'float32', [1]);
      g.input('encoder_hidden_states', 'float32', ['batch', 77, 16]);
      const extra = g.input('down_block_additional_residuals', 'float32', ['batch', 4, 'h', 'w']);
      g.named(g.op('Add', [sample, extra]), 'out_sample');
      g.output('out_sample', 'float32', ['batch', 4, 'h', 'w']);
      await writeFile(path.join(d, 'unet', 'model.onnx'), g.serialize().model);
    });
    await expect(loadModel(d, { provider: 'cpu' })).rejects.toThrow(
      /unet[/\\]model\.onnx takes inputs this engine does not feed: down_block_additional_residuals/,
    );
  });
});

describe("t2i doctor's quick look names the variant loading finds", () => {
  it.each(['sdxl-turbo', 'inpaint', 'lcm'] as const)('%s', async (variant) => {
    const d = path.join(dir, `inspect-${variant}`);
    await writeOracleModel(d, { variant });
    const model = await loadModel(d, { provider: 'cpu' });
    await model.release();
    const report = await inspectModel(d);
    expect(report.problems).toEqual([]);
    expect(report.variant!.startsWith(`${model.variant.name} (`)).toBe(true);
  });

  it('and the reason a directory is rejected', async () => {
    const d = path.join(dir, 'inspect-no-encoder-2');
    await writeOracleModel(d, { variant: 'sdxl' });
    await rm(path.join(d, 'text_encoder_2'), { recursive: true });
    expect((await inspectModel(d)).problems.join('\n')).toMatch(/takes text_embeds and time_ids \(SDXL\) but text_encoder_2\/model\.onnx is missing/);
  });
});

describe('execution providers', () => {
  it('auto settles on an available provider and says which', async () => {
    const logs: string[] = [];
    const model = await loadModel(good, { provider: 'auto', log: (m) => logs.push(m) });
    await model.release();
    expect(availableProviders()).toContain(model.provider);
    expect(logs.join('\n')).toContain(`execution provider: ${model.provider} (asked for auto)`);
  });

  it('asking for one that is not installed fails with the list of available ones', async () => {
    const missing = ['cuda', 'coreml'].find((p) => !availableProviders().includes(p as 'cuda'));
    expect(missing).toBeDefined();
    await expect(loadModel(good, { provider: missing as 'cuda' })).rejects.toThrow(
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
      // The host's 5 ms timer over the denoising steps. A UNet run on the host's thread holds its
      // loop for each whole step: the overdue timer then fires once between two steps, whatever
      // their length. Off the host's thread it keeps firing during the steps (a GC pause or a
      // busy machine costs some ticks, not most).
      const ticks: number[] = [];
      const timer = setInterval(() => ticks.push(performance.now()), 5);
      const steps: number[] = [];
      const g = await engine.generate({ ...RUN, numSteps: 8, width: 384, height: 384 }, { onProgress: () => steps.push(performance.now()) });
      clearInterval(timer);
      expect(g.png.subarray(1, 4).toString()).toBe('PNG');
      const during = ticks.filter((t) => t > steps[0]! && t < steps.at(-1)!).length;
      expect(during).toBeGreaterThan(2 * (steps.length - 1));
    } finally {
      await engine.close();
    }
  });

  it('runs queued generations one at a time, reports progress and cancels on abort', async () => {
    const engine = await Engine.start({ modelDir: good, provider: 'cpu' });
    try {
      expect(engine.info).toMatchObject({ provider: 'cpu', defaultScheduler: 'pndm', variant: 'SD 1.x/2.x-shaped (text hidden size 16)' });
      // Every generation's life as the host sees it: started (the engine's id), each progress
      // event, settled. One at a time means no two generations' starts and steps interleave;
      // a generation settles once its PNG is encoded, which overlaps the next one's first steps.
      const events: string[] = [];
      const controller = new AbortController();
      const queued = (label: string, params: GenerateParams, signal?: AbortSignal) =>
        engine
          .generate(params, {
            ...(signal ? { signal } : {}),
            onStart: () => events.push(`${label} start`),
            onProgress: (p) => {
              events.push(`${label} step`);
              if (label === 'a' && p.step === 2) controller.abort();
            },
          })
          .finally(() => events.push(`${label} settled`));
      const a = queued('a', { ...RUN, numSteps: 40 }, controller.signal);
      const b = queued('b', { ...RUN, prompt: 'a blue square', numSteps: 6 });
      const c = queued('c', { ...RUN, prompt: 'a green dot', numSteps: 4 });
      await expect(a).rejects.toMatchObject({ name: 'AbortError' });
      expect((await b).seed).toBe(11);
      await c;
      const blocks = events.filter((e) => !e.endsWith('settled')).map((e) => e.split(' ')[0]!);
      // Contiguous blocks a..., b..., c...: no start or step of one generation between another's start and last step.
      expect(blocks.filter((label, i) => i === 0 || label !== blocks[i - 1])).toEqual(['a', 'b', 'c']);
      for (const label of ['a', 'b', 'c']) {
        const mine = events.filter((e) => e.startsWith(label));
        expect(mine[0]).toBe(`${label} start`);
        expect(mine.at(-1)).toBe(`${label} settled`);
      }
      expect(events.filter((e) => e === 'a step').length).toBeLessThan(40);
      expect(events.filter((e) => e === 'b step').length).toBe(6);
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
