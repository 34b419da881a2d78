import { GENERATION_DEFAULTS, type ModelDefaults } from './params.js';
import { schedulerForClass, type SchedulerConfig } from './schedulers/index.js';
import type { IoSpec } from './onnx/runtime.js';

/**
 * Which pipeline a model directory is for, decided from what the export declares (the UNet's
 * inputs, which folders exist) and from its configs, with the evidence for each conclusion so
 * that loading can say what it found, and why a directory is rejected.
 *
 *   SD 1.x / 2.x   text_encoder/ + a UNet taking (sample, timestep, encoder_hidden_states)
 *   SDXL           text_encoder_2/ too, and a UNet taking text_embeds and time_ids
 *   inpainting     a UNet whose sample has 9 channels (latents + mask + masked-image latents)
 *   LCM            a UNet taking timestep_cond (the guidance embedding of LCM-distilled models),
 *                  or an LCMScheduler config
 *   turbo          a scheduler config with trailing timestep spacing: Stability's SD-Turbo and
 *                  SDXL-Turbo exports ship it for their one-to-four-step sampling
 */

export interface ModelVariant {
  family: 'sd' | 'sdxl';
  /** What people call it: "SD 1.x", "SD 2.x v-prediction", "SDXL Turbo", "SD 1.x inpainting", ... */
  name: string;
  /** The UNet takes 9 channels: latents, mask, masked-image latents. */
  inpainting: boolean;
  /** The UNet takes timestep_cond, the embedding of guidance_scale - 1 (LCM-distilled UNets). */
  guidanceEmbedding: boolean;
  /** Its width (unet/config.json time_cond_proj_dim). */
  guidanceEmbeddingDim?: number;
  lcm: boolean;
  turbo: boolean;
  prediction: 'epsilon' | 'v_prediction' | 'sample';
  /** One line per conclusion: what was found, and where. */
  evidence: string[];
}

/** What loading read from the directory, before deciding anything. */
export interface ModelFacts {
  dir: string;
  modelIndex: Record<string, unknown>;
  schedulerConfig: SchedulerConfig;
  /** unet/config.json, when the export wrote one (optimum does). */
  unetConfig: Record<string, unknown>;
  vaeConfig: Record<string, unknown>;
  /** Component folders that hold a model.onnx. */
  components: ReadonlySet<string>;
  unetFile: string;
  unetInputs: ReadonlyMap<string, IoSpec>;
  /** Width of the text encoders' hidden states (SD 1.x 768, SD 2.x 1024, SDXL 768 + 1280). */
  hiddenSize: number | undefined;
}

/** A directory this engine cannot run; the message says why. */
export class UnsupportedModelError extends Error {
  override name = 'UnsupportedModelError';
}

const KNOWN_UNET_INPUTS = ['sample', 'timestep', 'encoder_hidden_states', 'text_embeds', 'time_ids', 'timestep_cond'];
/** Pipelines with other architectures or tasks, by the class name diffusers writes in model_index.json. */
const OTHER_PIPELINES =
  /StableDiffusion3|Flux|Kandinsky|PixArt|Sana|StableCascade|Wuerstchen|Upscale|ControlNet|Video|Kolors|Hunyuan|Lumina|AuraFlow|CogView|Refiner|Instruct|Depth2Img/i;

export function detectVariant(f: ModelFacts): ModelVariant {
  const reject = (why: string): never => {
    throw new UnsupportedModelError(`${f.dir}: ${why}`);
  };
  const evidence: string[] = [];
  const className = typeof f.modelIndex._class_name === 'string' ? f.modelIndex._class_name : undefined;
  if (className && OTHER_PIPELINES.test(className)) {
    reject(`model_index.json names ${className}; this engine runs Stable Diffusion 1.x, 2.x and SDXL (with their inpainting, LCM and turbo variants)`);
  }
  const unknown = [...f.unetInputs.keys()].filter((name) => !KNOWN_UNET_INPUTS.includes(name));
  if (unknown.length > 0)
    reject(`${f.unetFile} takes inputs this engine does not feed: ${unknown.join(', ')} (ControlNet or adapter exports are not supported)`);

  // SDXL: the second text encoder and the UNet's added conditioning must come together.
  const addedInputs = ['text_embeds', 'time_ids'].filter((n) => f.unetInputs.has(n));
  const hasEncoder2 = f.components.has('text_encoder_2');
  if (addedInputs.length > 0 || hasEncoder2) {
    if (addedInputs.length < 2) reject(`text_encoder_2/ is there but ${f.unetFile} does not take text_embeds and time_ids; an SDXL UNet takes both`);
    if (!hasEncoder2) reject(`${f.unetFile} takes text_embeds and time_ids (SDXL) but text_encoder_2/model.onnx is missing`);
    if (!f.components.has('text_encoder') || f.modelIndex.requires_aesthetics_score === true || f.unetInputs.get('time_ids')?.shape[1] === 5) {
      reject('an SDXL refiner (one text encoder, aesthetic-score time_ids) is not supported; use an SDXL base or Turbo export');
    }
    evidence.push(`SDXL: text_encoder_2/ and a UNet taking text_embeds and time_ids`);
  }
  const family = hasEncoder2 ? 'sdxl' : 'sd';

  const channels = sampleChannels(f, className);
  if (channels.value !== 4 && channels.value !== 9) {
    reject(`${f.unetFile}: sample has ${channels.value} channels (${channels.source}); expected 4 (text-to-image) or 9 (inpainting)`);
  }
  const inpainting = channels.value === 9;
  if (inpainting) {
    evidence.push(`inpainting: the UNet's sample has 9 channels (${channels.source})`);
    if (family === 'sdxl') reject('SDXL inpainting UNets are not supported; use an SD 1.x or 2.x inpainting export');
    if (!f.components.has('vae_encoder')) reject('an inpainting model needs vae_encoder/model.onnx to encode the masked image, and it is missing');
  }

  const guidanceEmbedding = f.unetInputs.has('timestep_cond');
  let guidanceEmbeddingDim: number | undefined;
  if (guidanceEmbedding) {
    const declared = f.unetInputs.get('timestep_cond')!.shape[1];
    const configured = f.unetConfig.time_cond_proj_dim;
    guidanceEmbeddingDim = typeof declared === 'number' && declared > 0 ? declared : typeof configured === 'number' ? configured : undefined;
    if (!guidanceEmbeddingDim || guidanceEmbeddingDim < 4) {
      reject(
        `${f.unetFile} takes timestep_cond of width ${guidanceEmbeddingDim ?? 'unknown'} (neither the model nor unet/config.json time_cond_proj_dim says a usable one)`,
      );
    }
  }
  const lcm = guidanceEmbedding || f.schedulerConfig._class_name === 'LCMScheduler';
  if (guidanceEmbedding) evidence.push('LCM: the UNet takes timestep_cond (a guidance embedding), so guidance is its input, not a second batch');
  else if (lcm) evidence.push('LCM: scheduler_config.json names LCMScheduler');
  const turbo = !lcm && f.schedulerConfig.timestep_spacing === 'trailing';
  if (turbo) evidence.push('turbo: scheduler_config.json uses trailing timestep spacing (one to four steps, no guidance)');

  const prediction = f.schedulerConfig.prediction_type ?? 'epsilon';
  if (prediction === 'v_prediction') evidence.push('v-prediction: scheduler_config.json prediction_type');
  return {
    family,
    name: variantName(family, f.hiddenSize, prediction, inpainting, lcm, turbo),
    inpainting,
    guidanceEmbedding,
    ...(guidanceEmbeddingDim ? { guidanceEmbeddingDim } : {}),
    lcm,
    turbo,
    prediction,
    evidence,
  };
}

function sampleChannels(f: ModelFacts, className: string | undefined): { value: number; source: string } {
  const declared = f.unetInputs.get('sample')?.shape[1];
  if (typeof declared === 'number' && declared > 0) return { value: declared, source: 'declared by the ONNX model' };
  const configured = f.unetConfig.in_channels;
  if (typeof configured === 'number') return { value: configured, source: 'unet/config.json in_channels' };
  // diffusers' own converter leaves the channel dimension symbolic and writes no UNet config.
  if (className && /Inpaint/.test(className)) return { value: 9, source: `model_index.json names ${className}` };
  return { value: 4, source: 'symbolic in the ONNX model, no unet/config.json: assumed' };
}

function variantName(family: 'sd' | 'sdxl', hidden: number | undefined, prediction: string, inpainting: boolean, lcm: boolean, turbo: boolean): string {
  let base: string;
  if (family === 'sdxl') base = turbo ? 'SDXL Turbo' : 'SDXL';
  else if (turbo) base = 'SD-Turbo';
  else if (prediction === 'v_prediction' || hidden === 1024) base = 'SD 2.x';
  else if (hidden === 768) base = 'SD 1.x';
  else base = `SD 1.x/2.x-shaped (text hidden size ${hidden ?? 'unknown'})`;
  const parts = [base];
  if (prediction === 'v_prediction') parts.push('v-prediction');
  if (inpainting) parts.push('inpainting');
  if (lcm) parts.push('LCM');
  return parts.join(' ');
}

/**
 * Parameters a request leaves out: the model's native size (unet/config.json sample_size x 8),
 * the scheduler it ships with, and steps and guidance for what it was made for. Turbo: one step
 * without guidance (Stability's model cards); LCM with a guidance embedding: 4 steps at 8.5
 * (optimum's ORTLatentConsistencyModelPipeline); SDXL: guidance 5 and strength 0.3 (optimum's
 * SDXL pipelines); SD: this project's 50 steps at 9 and diffusers' strength 0.8.
 */
export function modelDefaults(v: ModelVariant, f: ModelFacts): ModelDefaults {
  const sampleSize = f.unetConfig.sample_size;
  const side = typeof sampleSize === 'number' && sampleSize > 0 ? sampleSize * 8 : v.family === 'sdxl' ? 1024 : GENERATION_DEFAULTS.width;
  let numSteps: number = GENERATION_DEFAULTS.numSteps;
  let guidanceScale: number = v.family === 'sdxl' ? 5 : GENERATION_DEFAULTS.guidanceScale;
  if (v.turbo) [numSteps, guidanceScale] = [1, 0];
  else if (v.guidanceEmbedding) [numSteps, guidanceScale] = [4, 8.5];
  else if (v.lcm) [numSteps, guidanceScale] = [4, 1];
  return {
    scheduler: schedulerForClass(f.schedulerConfig._class_name),
    numSteps,
    guidanceScale,
    width: side,
    height: side,
    strength: v.family === 'sdxl' ? 0.3 : 0.8,
  };
}
