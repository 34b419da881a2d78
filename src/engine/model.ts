import { existsSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { OnnxModel, providerCandidates, type GraphOptimization, type Provider, type ProviderChoice, type SessionOptions } from './onnx/runtime.js';
import { schedulerForClass, type SchedulerConfig, type SchedulerName } from './schedulers/index.js';
import { ClipTokenizer } from './tokenizer.js';

/**
 * A Stable Diffusion 1.x/2.x ONNX export in the diffusers/optimum layout:
 *
 *   model_index.json
 *   text_encoder/model.onnx   unet/model.onnx   vae_decoder/model.onnx   (+ weights.pb / model.onnx_data)
 *   tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
 *   scheduler/scheduler_config.json
 */

export const SD_VAE_SCALING_FACTOR = 0.18215;

export interface LoadOptions {
  provider?: ProviderChoice;
  /** intra-op threads per session; onnxruntime's default (all cores) when unset. */
  threads?: number;
  optimization?: GraphOptimization;
  log?: (msg: string) => void;
}

export interface LoadedModel {
  dir: string;
  provider: Provider;
  tokenizer: ClipTokenizer;
  textEncoder: OnnxModel;
  unet: OnnxModel;
  vaeDecoder: OnnxModel;
  schedulerConfig: SchedulerConfig;
  /** The scheduler the export ships with, when it is one we implement. */
  defaultScheduler: SchedulerName | undefined;
  vaeScalingFactor: number;
  /** Bytes of every model file and external weight file, for memory budgets. */
  sizeBytes: number;
  loadMs: number;
  release(): Promise<void>;
}

export async function readJson(file: string, expected: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    throw new Error(`${file}: file not found (expected ${expected})`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file}: not valid JSON (${(err as Error).message}); expected ${expected}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error(`${file}: expected ${expected}, found ${Array.isArray(value) ? 'an array' : typeof value}`);
  }
  return value as Record<string, unknown>;
}

async function componentSize(dir: string): Promise<number> {
  let total = 0;
  for (const name of ['model.onnx', 'model.onnx_data', 'weights.pb']) {
    const file = path.join(dir, name);
    if (existsSync(file)) total += (await stat(file)).size;
  }
  return total;
}

export async function loadModel(dir: string, options: LoadOptions = {}): Promise<LoadedModel> {
  const started = performance.now();
  const root = path.resolve(dir);
  if (!existsSync(root)) throw new Error(`${root}: model directory not found`);
  await readJson(path.join(root, 'model_index.json'), 'a diffusers model index (JSON object)');
  const schedulerConfig = (await readJson(
    path.join(root, 'scheduler', 'scheduler_config.json'),
    'a diffusers scheduler config (JSON object)',
  )) as SchedulerConfig;
  const vaeConfigFile = path.join(root, 'vae_decoder', 'config.json');
  const vaeConfig = existsSync(vaeConfigFile) ? await readJson(vaeConfigFile, 'a VAE config (JSON object)') : {};
  const vaeScalingFactor = typeof vaeConfig.scaling_factor === 'number' ? vaeConfig.scaling_factor : SD_VAE_SCALING_FACTOR;
  const tokenizer = await ClipTokenizer.fromDirectory(path.join(root, 'tokenizer'));

  const file = (c: string) => path.join(root, c, 'model.onnx');
  for (const c of ['text_encoder', 'unet', 'vae_decoder']) {
    if (!existsSync(file(c))) throw new Error(`${file(c)}: file not found (expected the ${c} ONNX model)`);
  }

  // `auto` settles on the first provider that opens the text encoder: a CUDA library without a
  // usable driver fails there, cheaply, before the UNet is read.
  const session: SessionOptions = {
    ...(options.threads ? { threads: options.threads } : {}),
    ...(options.optimization ? { optimization: options.optimization } : {}),
  };
  const candidates = providerCandidates(options.provider ?? 'auto');
  let textEncoder: OnnxModel | undefined;
  let provider: Provider | undefined;
  const failures: string[] = [];
  for (const p of candidates) {
    try {
      textEncoder = await OnnxModel.open(file('text_encoder'), p, session);
      provider = p;
      break;
    } catch (err) {
      if (candidates.length === 1) throw err;
      failures.push(`${p}: ${(err as Error).message}`);
    }
  }
  if (!textEncoder || !provider) throw new Error(`no execution provider could load the model:\n${failures.join('\n')}`);
  if (failures.length > 0) options.log?.(`execution providers that failed: ${failures.join('; ')}`);
  options.log?.(`execution provider: ${provider} (asked for ${options.provider ?? 'auto'})`);

  const [unet, vaeDecoder] = await Promise.all([OnnxModel.open(file('unet'), provider, session), OnnxModel.open(file('vae_decoder'), provider, session)]);
  checkSignature(textEncoder, unet, vaeDecoder);

  const sizes = await Promise.all(['text_encoder', 'unet', 'vae_decoder'].map((c) => componentSize(path.join(root, c))));
  return {
    dir: root,
    provider,
    tokenizer,
    textEncoder,
    unet,
    vaeDecoder,
    schedulerConfig,
    defaultScheduler: schedulerForClass(schedulerConfig._class_name),
    vaeScalingFactor,
    sizeBytes: sizes.reduce((a, b) => a + b, 0),
    loadMs: performance.now() - started,
    async release() {
      await Promise.all([textEncoder.release(), unet.release(), vaeDecoder.release()]);
    },
  };
}

/** Fails at load time, naming the file, when an export does not have SD's inputs and outputs. */
function checkSignature(textEncoder: OnnxModel, unet: OnnxModel, vae: OnnxModel): void {
  const ids = textEncoder.input('input_ids');
  if (ids.type !== 'int32' && ids.type !== 'int64') throw new Error(`${textEncoder.file}: input_ids is ${ids.type}; expected int32 or int64`);
  const hiddenName = textEncoder.outputs.has('last_hidden_state') ? 'last_hidden_state' : [...textEncoder.outputs.keys()][0];
  if (!hiddenName) throw new Error(`${textEncoder.file}: the model has no outputs`);
  for (const name of ['sample', 'encoder_hidden_states']) {
    const spec = unet.input(name);
    if (spec.type !== 'float32' && spec.type !== 'float16') throw new Error(`${unet.file}: ${name} is ${spec.type}; expected float32 or float16`);
  }
  const t = unet.input('timestep');
  if (t.shape.length > 1) throw new Error(`${unet.file}: timestep has rank ${t.shape.length}; expected a scalar or shape [1]`);
  if (unet.outputs.size === 0) throw new Error(`${unet.file}: the model has no outputs`);
  vae.input('latent_sample');
  if (vae.outputs.size === 0) throw new Error(`${vae.file}: the model has no outputs`);
}
