import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { noiseSchedule } from '../schedulers/betas.js';
import type { SchedulerConfig } from '../schedulers/types.js';
import { ClipTokenizer, clipVocabFromBpeMerges, writeTokenizerDirectory } from '../tokenizer.js';
import type { SerializedModel } from './onnx-builder.js';
import { oracleTextEncoder, oracleUnet, oracleVaeDecoder, oracleVaeEncoder, type TimestepInput } from './oracle.js';
import { oracleVocabularyWords } from './oracle-spec.js';
import { DEFAULT_RANDOM_MODEL, randomTextEncoder, randomUnet, randomVaeDecoder, randomVaeEncoder, type RandomModelOptions } from './random-model.js';

/**
 * Writes test models as complete diffusers/optimum ONNX directories (model_index.json,
 * scheduler, tokenizer and four ONNX components), loadable by this engine and by diffusers'
 * `OnnxStableDiffusionPipeline.from_pretrained(dir)`.
 */

/** Stable Diffusion 1.5's scheduler_config.json. */
export const SD15_SCHEDULER_CONFIG: SchedulerConfig & { _class_name: string; _diffusers_version: string } = {
  _class_name: 'PNDMScheduler',
  _diffusers_version: '0.30.0',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  clip_sample: false,
  num_train_timesteps: 1000,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  trained_betas: null,
};

/**
 * A small CLIP-format BPE vocabulary in which each oracle word is one token: the 512 byte
 * symbols plus a chain of merges per word, added only where the merges so far do not already
 * join it. Any other text still tokenizes, byte by byte.
 */
export function wordVocabulary(words: string[]): { vocab: Map<string, number>; merges: string[] } {
  const merges: string[] = [];
  const build = () => clipVocabFromBpeMerges(['#version: 0.2', ...merges], merges.length);
  for (const word of words) {
    const { vocab } = build();
    const byId = new Map([...vocab].map(([tok, id]) => [id, tok]));
    const pieces = ClipTokenizer.fromData(build())
      .tokenize(word)
      .map((id) => byId.get(id)!);
    let joined = pieces[0]!;
    for (const piece of pieces.slice(1)) {
      merges.push(`${joined} ${piece}`);
      joined += piece;
    }
  }
  const result = build();
  const check = ClipTokenizer.fromData(result);
  for (const word of words) {
    if (check.tokenize(word).length !== 1) throw new Error(`word vocabulary: "${word}" does not tokenize to a single token`);
  }
  return result;
}

export interface OracleModelOptions {
  timestep?: TimestepInput;
  idsType?: 'int32' | 'int64';
}

export async function writeOracleModel(dir: string, options: OracleModelOptions = {}): Promise<void> {
  const tok = wordVocabulary(oracleVocabularyWords());
  const schedule = noiseSchedule({
    num_train_timesteps: SD15_SCHEDULER_CONFIG.num_train_timesteps!,
    beta_start: SD15_SCHEDULER_CONFIG.beta_start!,
    beta_end: SD15_SCHEDULER_CONFIG.beta_end!,
    beta_schedule: SD15_SCHEDULER_CONFIG.beta_schedule!,
  });
  const sigmas = schedule.alphasCumprod.map((a) => Math.sqrt((1 - a) / a));
  await writeModelDirectory(dir, {
    kind: 'oracle',
    tokenizer: tok,
    textEncoder: oracleTextEncoder(tok.vocab, options.idsType ?? 'int32'),
    // diffusers' own ONNX converter exports a float timestep, which passes Euler's fractional
    // timesteps through unchanged.
    unet: oracleUnet(sigmas, options.timestep ?? { type: 'float32', rank: 1 }),
    vaeDecoder: oracleVaeDecoder(),
    vaeEncoder: oracleVaeEncoder(),
  });
}

export async function writeRandomModel(dir: string, options: Partial<RandomModelOptions> = {}): Promise<RandomModelOptions> {
  const tok = wordVocabulary(oracleVocabularyWords());
  const o: RandomModelOptions = { ...DEFAULT_RANDOM_MODEL, ...options, vocabSize: tok.vocab.size };
  await writeModelDirectory(dir, {
    kind: 'random',
    tokenizer: tok,
    textEncoder: randomTextEncoder(o),
    unet: randomUnet(o),
    vaeDecoder: randomVaeDecoder(o),
    vaeEncoder: randomVaeEncoder(o),
    options: o,
  });
  return o;
}

interface ModelFiles {
  kind: 'oracle' | 'random';
  tokenizer: { vocab: Map<string, number>; merges: string[] };
  textEncoder: SerializedModel;
  unet: SerializedModel;
  vaeDecoder: SerializedModel;
  vaeEncoder: SerializedModel;
  options?: RandomModelOptions;
}

async function writeModelDirectory(dir: string, m: ModelFiles): Promise<void> {
  await mkdir(dir, { recursive: true });
  const json = (file: string, value: unknown) => writeFile(path.join(dir, file), JSON.stringify(value, null, 2) + '\n');
  await json('model_index.json', {
    _class_name: 'OnnxStableDiffusionPipeline',
    _diffusers_version: '0.30.0',
    feature_extractor: [null, null],
    requires_safety_checker: false,
    safety_checker: [null, null],
    scheduler: ['diffusers', 'PNDMScheduler'],
    text_encoder: ['diffusers', 'OnnxRuntimeModel'],
    tokenizer: ['transformers', 'CLIPTokenizer'],
    unet: ['diffusers', 'OnnxRuntimeModel'],
    vae_decoder: ['diffusers', 'OnnxRuntimeModel'],
    vae_encoder: ['diffusers', 'OnnxRuntimeModel'],
  });
  await mkdir(path.join(dir, 'scheduler'), { recursive: true });
  await json('scheduler/scheduler_config.json', SD15_SCHEDULER_CONFIG);
  await writeTokenizerDirectory(path.join(dir, 'tokenizer'), { ...m.tokenizer, padToken: '<|endoftext|>', modelMaxLength: 77 });
  const components: Array<[string, SerializedModel]> = [
    ['text_encoder', m.textEncoder],
    ['unet', m.unet],
    ['vae_decoder', m.vaeDecoder],
    ['vae_encoder', m.vaeEncoder],
  ];
  for (const [name, model] of components) {
    await mkdir(path.join(dir, name), { recursive: true });
    await writeFile(path.join(dir, name, 'model.onnx'), model.model);
    if (model.externalData) await writeFile(path.join(dir, name, 'model.onnx_data'), model.externalData);
  }
  // Not read by any loader: says what made the directory, for people and tests.
  await json('t2i_test_model.json', { kind: m.kind, ...(m.options ? { options: m.options } : {}) });
}
