import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { noiseSchedule } from '../schedulers/betas.js';
import type { SchedulerConfig } from '../schedulers/types.js';
import type { SerializedModel } from './onnx-builder.js';
import {
  oracleTextEncoder,
  oracleTextEncoderXl,
  oracleUnet,
  oracleVaeDecoder,
  oracleVaeEncoder,
  SDXL_VAE_SCALING_FACTOR,
  VAE_SCALING_FACTOR,
} from './oracle.js';
import { ORACLE_HIDDEN_SIZE, oracleVocabularyWords } from './oracle-spec.js';
import {
  DEFAULT_RANDOM_MODEL,
  randomTextEncoder,
  randomTextEncoderXl,
  randomUnet,
  randomVaeDecoder,
  randomVaeEncoder,
  type RandomModelOptions,
} from './random-model.js';
import { wordVocabulary, writeTokenizerDirectory } from './tokenizer-files.js';
import type { TimestepInput } from './unet-pieces.js';

/**
 * Writes test models as complete diffusers/optimum ONNX directories (model_index.json,
 * scheduler, tokenizer(s), configs and the ONNX components), loadable by this engine and by the
 * reference pipelines (diffusers' OnnxStableDiffusionPipeline for SD; optimum's for SDXL and LCM).
 *
 * Variants, each with the configs its real counterpart ships:
 *   sd          SD 1.5 (PNDM)
 *   sd2-v       SD 2.x v-prediction (DDIM, "!" padding)
 *   inpaint     SD 1.5 inpainting: a 9-channel UNet
 *   lcm         an LCM-distilled SD UNet taking timestep_cond (LCMScheduler)
 *   sdxl        SDXL base: two text encoders, text_embeds and time_ids, VAE factor 0.13025, 1024x1024
 *   sdxl-turbo  SDXL-Turbo: SDXL with Euler ancestral and trailing spacing, 512x512
 */

export const TEST_VARIANTS = ['sd', 'sd2-v', 'inpaint', 'lcm', 'sdxl', 'sdxl-turbo'] as const;
export type TestVariant = (typeof TEST_VARIANTS)[number];

type SchedulerFile = SchedulerConfig & { _class_name: string; _diffusers_version: string };

/** Stable Diffusion 1.5's scheduler_config.json. */
export const SD15_SCHEDULER_CONFIG: SchedulerFile = {
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

const EULER_KEYS = { interpolation_type: 'linear', prediction_type: 'epsilon', sample_max_value: 1.0, use_karras_sigmas: false } as const;

const SCHEDULERS: Record<TestVariant, SchedulerFile> = {
  sd: SD15_SCHEDULER_CONFIG,
  'sd2-v': { ...SD15_SCHEDULER_CONFIG, _class_name: 'DDIMScheduler', prediction_type: 'v_prediction', timestep_spacing: 'leading' },
  inpaint: SD15_SCHEDULER_CONFIG,
  lcm: {
    ...SD15_SCHEDULER_CONFIG,
    _class_name: 'LCMScheduler',
    original_inference_steps: 50,
    prediction_type: 'epsilon',
    set_alpha_to_one: true,
    timestep_scaling: 10.0,
    timestep_spacing: 'leading',
  },
  sdxl: { ...SD15_SCHEDULER_CONFIG, ...EULER_KEYS, _class_name: 'EulerDiscreteScheduler', timestep_spacing: 'leading' },
  'sdxl-turbo': { ...SD15_SCHEDULER_CONFIG, ...EULER_KEYS, _class_name: 'EulerAncestralDiscreteScheduler', timestep_spacing: 'trailing' },
};

const PIPELINE_CLASS: Record<TestVariant, string> = {
  sd: 'OnnxStableDiffusionPipeline',
  'sd2-v': 'OnnxStableDiffusionPipeline',
  inpaint: 'OnnxStableDiffusionInpaintPipeline',
  lcm: 'LatentConsistencyModelPipeline',
  sdxl: 'StableDiffusionXLPipeline',
  'sdxl-turbo': 'StableDiffusionXLPipeline',
};

/** The LCM test UNet's timestep_cond width (LCM Dreamshaper's is 256; the oracle needs only 8). */
export const TEST_GUIDANCE_EMBEDDING_DIM = 8;

const isXl = (v: TestVariant) => v === 'sdxl' || v === 'sdxl-turbo';

interface VariantShape {
  prediction: 'epsilon' | 'v_prediction';
  inChannels: 4 | 9;
  guidanceEmbeddingDim: number | null;
  vaeScalingFactor: number;
}

function shapeOf(v: TestVariant): VariantShape {
  return {
    prediction: v === 'sd2-v' ? 'v_prediction' : 'epsilon',
    inChannels: v === 'inpaint' ? 9 : 4,
    guidanceEmbeddingDim: v === 'lcm' ? TEST_GUIDANCE_EMBEDDING_DIM : null,
    vaeScalingFactor: isXl(v) ? SDXL_VAE_SCALING_FACTOR : VAE_SCALING_FACTOR,
  };
}

function trainingSigmas(): Float64Array {
  const c = SD15_SCHEDULER_CONFIG;
  const schedule = noiseSchedule({
    num_train_timesteps: c.num_train_timesteps!,
    beta_start: c.beta_start!,
    beta_end: c.beta_end!,
    beta_schedule: c.beta_schedule!,
  });
  return schedule.alphasCumprod.map((a) => Math.sqrt((1 - a) / a));
}

export interface OracleModelOptions {
  variant?: TestVariant;
  timestep?: TimestepInput;
  idsType?: 'int32' | 'int64';
}

export async function writeOracleModel(dir: string, options: OracleModelOptions = {}): Promise<void> {
  const variant = options.variant ?? 'sd';
  const tok = wordVocabulary(oracleVocabularyWords());
  const shape = shapeOf(variant);
  const ids = options.idsType ?? 'int32';
  await writeModelDirectory(dir, variant, {
    kind: 'oracle',
    tokenizer: tok,
    textEncoder: isXl(variant) ? oracleTextEncoderXl(tok.vocab, 1, ids) : oracleTextEncoder(tok.vocab, ids),
    ...(isXl(variant) ? { textEncoder2: oracleTextEncoderXl(tok.vocab, 2, ids) } : {}),
    // diffusers' own ONNX converter exports a float timestep, which passes Euler's fractional
    // timesteps through unchanged.
    unet: oracleUnet(trainingSigmas(), {
      timestep: options.timestep ?? { type: 'float32', rank: 1 },
      prediction: shape.prediction,
      inChannels: shape.inChannels,
      sdxl: isXl(variant),
      ...(shape.guidanceEmbeddingDim ? { guidanceEmbeddingDim: shape.guidanceEmbeddingDim } : {}),
    }),
    vaeDecoder: oracleVaeDecoder(shape.vaeScalingFactor),
    vaeEncoder: oracleVaeEncoder(shape.vaeScalingFactor),
    unetConfig: unetConfig(variant, shape, isXl(variant) ? 2 * ORACLE_HIDDEN_SIZE : ORACLE_HIDDEN_SIZE),
  });
}

export type RandomModelRequest = Partial<RandomModelOptions> & { variant?: TestVariant };

export async function writeRandomModel(dir: string, request: RandomModelRequest = {}): Promise<RandomModelOptions> {
  const { variant = 'sd', ...options } = request;
  const tok = wordVocabulary(oracleVocabularyWords());
  const o: RandomModelOptions = {
    ...DEFAULT_RANDOM_MODEL,
    ...shapeOf(variant),
    ...(isXl(variant) ? { sdxl: { hiddenSize2: 96, pooledSize: 48 } } : {}),
    ...options,
    vocabSize: tok.vocab.size,
  };
  await writeModelDirectory(dir, variant, {
    kind: 'random',
    tokenizer: tok,
    textEncoder: o.sdxl ? randomTextEncoderXl(o, 1) : randomTextEncoder(o),
    ...(o.sdxl ? { textEncoder2: randomTextEncoderXl(o, 2) } : {}),
    unet: randomUnet(o, trainingSigmas()),
    vaeDecoder: randomVaeDecoder(o),
    vaeEncoder: randomVaeEncoder(o),
    unetConfig: unetConfig(variant, o, o.hiddenSize + (o.sdxl?.hiddenSize2 ?? 0)),
    options: o,
  });
  return o;
}

/** unet/config.json as optimum writes it, with the keys the loader reads; SD 1.5's test model has none, like diffusers' converter. */
function unetConfig(variant: TestVariant, shape: VariantShape, crossAttentionDim: number): Record<string, unknown> | undefined {
  if (variant === 'sd') return undefined;
  return {
    _class_name: 'UNet2DConditionModel',
    in_channels: shape.inChannels,
    out_channels: 4,
    sample_size: variant === 'sdxl' ? 128 : 64,
    cross_attention_dim: crossAttentionDim,
    time_cond_proj_dim: shape.guidanceEmbeddingDim,
    ...(isXl(variant) ? { addition_embed_type: 'text_time' } : {}),
  };
}

interface ModelFiles {
  kind: 'oracle' | 'random';
  tokenizer: { vocab: Map<string, number>; merges: string[] };
  textEncoder: SerializedModel;
  textEncoder2?: SerializedModel;
  unet: SerializedModel;
  vaeDecoder: SerializedModel;
  vaeEncoder: SerializedModel;
  unetConfig: Record<string, unknown> | undefined;
  options?: RandomModelOptions;
}

async function writeModelDirectory(dir: string, variant: TestVariant, m: ModelFiles): Promise<void> {
  await mkdir(dir, { recursive: true });
  const json = async (file: string, value: unknown) => {
    await mkdir(path.dirname(path.join(dir, file)), { recursive: true });
    await writeFile(path.join(dir, file), JSON.stringify(value, null, 2) + '\n');
  };
  const scheduler = SCHEDULERS[variant];
  const xl = isXl(variant);
  const onnx = ['diffusers', 'OnnxRuntimeModel'];
  await json('model_index.json', {
    _class_name: PIPELINE_CLASS[variant],
    _diffusers_version: '0.30.0',
    ...(xl
      ? { force_zeros_for_empty_prompt: true, text_encoder_2: onnx, tokenizer_2: ['transformers', 'CLIPTokenizer'] }
      : { feature_extractor: [null, null], requires_safety_checker: false, safety_checker: [null, null] }),
    scheduler: ['diffusers', scheduler._class_name],
    text_encoder: onnx,
    tokenizer: ['transformers', 'CLIPTokenizer'],
    unet: onnx,
    vae_decoder: onnx,
    vae_encoder: onnx,
  });
  await json('scheduler/scheduler_config.json', scheduler);
  // SD 2.x and SDXL's second tokenizer pad with "!" (id 0 in CLIP's vocabulary), SD 1.x with the end token.
  await writeTokenizerDirectory(path.join(dir, 'tokenizer'), { ...m.tokenizer, padToken: variant === 'sd2-v' ? '!' : '<|endoftext|>', modelMaxLength: 77 });
  if (xl) await writeTokenizerDirectory(path.join(dir, 'tokenizer_2'), { ...m.tokenizer, padToken: '!', modelMaxLength: 77 });
  const factor = m.options?.vaeScalingFactor ?? shapeOf(variant).vaeScalingFactor;
  if (variant !== 'sd') await json('vae_decoder/config.json', { _class_name: 'AutoencoderKL', scaling_factor: factor, force_upcast: xl });
  if (m.unetConfig) await json('unet/config.json', m.unetConfig);
  const components: Array<[string, SerializedModel | undefined]> = [
    ['text_encoder', m.textEncoder],
    ['text_encoder_2', m.textEncoder2],
    ['unet', m.unet],
    ['vae_decoder', m.vaeDecoder],
    ['vae_encoder', m.vaeEncoder],
  ];
  for (const [name, model] of components) {
    if (!model) continue;
    await mkdir(path.join(dir, name), { recursive: true });
    await writeFile(path.join(dir, name, 'model.onnx'), model.model);
    if (model.externalData) await writeFile(path.join(dir, name, 'model.onnx_data'), model.externalData);
  }
  // Not read by any loader: says what made the directory, for people and tests.
  await json('t2i_test_model.json', { kind: m.kind, variant, ...(m.options ? { options: m.options } : {}) });
}
