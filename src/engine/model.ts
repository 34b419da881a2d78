import { existsSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { OnnxModel, providerCandidates, type GraphOptimization, type Provider, type ProviderChoice, type SessionOptions } from './onnx/runtime.js';
import type { ModelDefaults } from './params.js';
import type { SchedulerConfig, SchedulerName } from './schedulers/index.js';
import { ClipTokenizer } from './tokenizer.js';
import { detectVariant, modelDefaults, type ModelFacts, type ModelVariant } from './variant.js';

/**
 * A Stable Diffusion ONNX export in the diffusers/optimum layout:
 *
 *   model_index.json
 *   text_encoder/model.onnx   unet/model.onnx   vae_decoder/model.onnx   (+ weights.pb / model.onnx_data)
 *   tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
 *   scheduler/scheduler_config.json
 *
 * and, where the model has them: text_encoder_2/ + tokenizer_2/ (SDXL), vae_encoder/ (image
 * inputs), unet/config.json and vae_decoder/config.json (sizes, scaling factor).
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
  variant: ModelVariant;
  /** What a request that leaves parameters out gets (the model's size, steps, guidance, scheduler). */
  defaults: ModelDefaults;
  tokenizer: ClipTokenizer;
  textEncoder: OnnxModel;
  /** SDXL's second tokenizer and text encoder (OpenCLIP bigG). */
  tokenizer2?: ClipTokenizer;
  textEncoder2?: OnnxModel;
  unet: OnnxModel;
  vaeDecoder: OnnxModel;
  /** Opened on first use: only image inputs need it, and it costs memory. */
  vaeEncoder(): Promise<OnnxModel>;
  /** The export has vae_encoder/model.onnx, so it can take image inputs. */
  hasVaeEncoder: boolean;
  schedulerConfig: SchedulerConfig;
  /** The scheduler the export ships with, when it is one we implement. */
  defaultScheduler: SchedulerName | undefined;
  vaeScalingFactor: number;
  /** SDXL: an absent negative prompt gets zero embeddings (model_index.json, default true). */
  forceZerosForEmptyPrompt: boolean;
  /** Bytes of every model file and external weight file, for memory budgets. */
  sizeBytes: number;
  loadMs: number;
  /** Time inside session.run over every session of this model. */
  sessionRunMs(): number;
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
    throw new Error(`${file}: not valid JSON (${(err as Error).message}); expected ${expected}`, { cause: err });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error(`${file}: expected ${expected}, found ${Array.isArray(value) ? 'an array' : typeof value}`);
  }
  return value as Record<string, unknown>;
}

async function optionalJson(file: string, expected: string): Promise<Record<string, unknown>> {
  return existsSync(file) ? readJson(file, expected) : {};
}

async function componentSize(dir: string): Promise<number> {
  let total = 0;
  for (const name of ['model.onnx', 'model.onnx_data', 'weights.pb']) {
    const file = path.join(dir, name);
    if (existsSync(file)) total += (await stat(file)).size;
  }
  return total;
}

const COMPONENTS = ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder'] as const;

export async function loadModel(dir: string, options: LoadOptions = {}): Promise<LoadedModel> {
  const started = performance.now();
  const root = path.resolve(dir);
  if (!existsSync(root)) throw new Error(`${root}: model directory not found`);
  const modelIndex = await readJson(path.join(root, 'model_index.json'), 'a diffusers model index (JSON object)');
  const schedulerConfig = (await readJson(
    path.join(root, 'scheduler', 'scheduler_config.json'),
    'a diffusers scheduler config (JSON object)',
  )) as SchedulerConfig;
  const vaeConfig = await optionalJson(path.join(root, 'vae_decoder', 'config.json'), 'a VAE config (JSON object)');
  const unetConfig = await optionalJson(path.join(root, 'unet', 'config.json'), 'a UNet config (JSON object)');
  const file = (c: string) => path.join(root, c, 'model.onnx');
  const components = new Set(COMPONENTS.filter((c) => existsSync(file(c))));
  if (!components.has('unet') && existsSync(path.join(root, 'transformer'))) {
    throw new Error(`${root}: has a transformer/ and no unet/: a diffusion-transformer model (SD3, Flux, ...), which this engine does not run`);
  }
  for (const c of ['text_encoder', 'unet', 'vae_decoder']) {
    if (!components.has(c as 'unet')) throw new Error(`${file(c)}: file not found (expected the ${c} ONNX model)`);
  }
  const tokenizer = await ClipTokenizer.fromDirectory(path.join(root, 'tokenizer'));
  const tokenizer2 = components.has('text_encoder_2') ? await ClipTokenizer.fromDirectory(path.join(root, 'tokenizer_2')) : undefined;

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

  const open = (c: string) => OnnxModel.open(file(c), provider, session);
  const opened: OnnxModel[] = [textEncoder];
  try {
    const [unet, vaeDecoder, textEncoder2] = await Promise.all([
      open('unet'),
      open('vae_decoder'),
      components.has('text_encoder_2') ? open('text_encoder_2') : undefined,
    ]);
    opened.push(unet, vaeDecoder, ...(textEncoder2 ? [textEncoder2] : []));
    // Every variant's UNet takes these; a missing one is named before anything else is concluded.
    for (const name of ['sample', 'timestep', 'encoder_hidden_states']) unet.input(name);
    const facts: ModelFacts = {
      dir: root,
      modelIndex,
      schedulerConfig,
      unetConfig,
      vaeConfig,
      components,
      unetFile: unet.file,
      unetInputs: unet.inputs,
      hiddenSize: hiddenSizeOf(unet, unetConfig),
    };
    const variant = detectVariant(facts);
    checkSignature(variant, textEncoder, textEncoder2, unet, vaeDecoder);
    const defaults = modelDefaults(variant, facts);
    const vaeScalingFactor = typeof vaeConfig.scaling_factor === 'number' ? vaeConfig.scaling_factor : SD_VAE_SCALING_FACTOR;
    options.log?.(describe(variant, defaults, vaeScalingFactor, typeof vaeConfig.scaling_factor === 'number'));
    if (variant.family === 'sdxl' && vaeDecoder.input('latent_sample').type === 'float16' && vaeConfig.force_upcast !== false) {
      options.log?.(
        `warning: ${vaeDecoder.file} runs in float16 and its config does not say it is safe to (force_upcast): SDXL's VAE overflows in half precision; an export of the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) or a float32 VAE avoids it`,
      );
    }

    // The VAE encoder is opened on first use (only image inputs need it), once.
    let vaeEncoder: Promise<OnnxModel> | undefined = variant.inpainting ? open('vae_encoder') : undefined;
    if (vaeEncoder) opened.push(await vaeEncoder);
    const encoder = (): Promise<OnnxModel> => {
      if (!components.has('vae_encoder')) return Promise.reject(new Error(`${file('vae_encoder')}: file not found (image inputs need the VAE encoder)`));
      vaeEncoder ??= open('vae_encoder').then((m) => {
        opened.push(m);
        return m;
      });
      return vaeEncoder;
    };

    const sizes = await Promise.all([...components].map((c) => componentSize(path.join(root, c))));
    return {
      dir: root,
      provider,
      variant,
      defaults,
      tokenizer,
      textEncoder,
      ...(tokenizer2 && textEncoder2 ? { tokenizer2, textEncoder2 } : {}),
      unet,
      vaeDecoder,
      vaeEncoder: encoder,
      hasVaeEncoder: components.has('vae_encoder'),
      schedulerConfig,
      defaultScheduler: defaults.scheduler,
      vaeScalingFactor,
      forceZerosForEmptyPrompt: modelIndex.force_zeros_for_empty_prompt !== false,
      sizeBytes: sizes.reduce((a, b) => a + b, 0),
      loadMs: performance.now() - started,
      sessionRunMs: () => opened.reduce((sum, m) => sum + m.runMs, 0),
      async release() {
        await Promise.all(opened.map((m) => m.release()));
      },
    };
  } catch (err) {
    await Promise.all(opened.map((m) => m.release().catch(() => undefined)));
    throw err;
  }
}

function hiddenSizeOf(unet: OnnxModel, unetConfig: Record<string, unknown>): number | undefined {
  const declared = unet.inputs.get('encoder_hidden_states')?.shape[2];
  if (typeof declared === 'number' && declared > 0) return declared;
  return typeof unetConfig.cross_attention_dim === 'number' ? unetConfig.cross_attention_dim : undefined;
}

function describe(v: ModelVariant, d: ModelDefaults, vaeScale: number, vaeScaleFromConfig: boolean): string {
  const facts = v.evidence.length > 0 ? ` (${v.evidence.join('; ')})` : '';
  const scale = `VAE scaling factor ${vaeScale}${vaeScaleFromConfig ? '' : ' (no vae_decoder/config.json: the SD default)'}`;
  return `model: ${v.name}${facts}; defaults: ${d.numSteps} steps, guidance ${d.guidanceScale}, ${d.width}x${d.height}, scheduler ${d.scheduler ?? 'pndm'}; ${scale}`;
}

/** Fails at load time, naming the file, when an export does not have the inputs and outputs its variant needs. */
function checkSignature(v: ModelVariant, textEncoder: OnnxModel, textEncoder2: OnnxModel | undefined, unet: OnnxModel, vae: OnnxModel): void {
  for (const te of [textEncoder, ...(textEncoder2 ? [textEncoder2] : [])]) {
    const ids = te.input('input_ids');
    if (ids.type !== 'int32' && ids.type !== 'int64') throw new Error(`${te.file}: input_ids is ${ids.type}; expected int32 or int64`);
    if (te.outputs.size === 0) throw new Error(`${te.file}: the model has no outputs`);
    if (v.family === 'sdxl' && !hiddenStateOutputs(te).penultimate) {
      throw new Error(`${te.file}: SDXL takes the penultimate hidden state, and this text encoder has no hidden_states.N outputs (export it with optimum)`);
    }
  }
  for (const name of ['sample', 'encoder_hidden_states', ...(v.family === 'sdxl' ? ['text_embeds', 'time_ids'] : [])]) {
    const spec = unet.input(name);
    if (spec.type !== 'float32' && spec.type !== 'float16') throw new Error(`${unet.file}: ${name} is ${spec.type}; expected float32 or float16`);
  }
  const t = unet.input('timestep');
  if (t.shape.length > 1) throw new Error(`${unet.file}: timestep has rank ${t.shape.length}; expected a scalar or shape [1]`);
  if (unet.outputs.size === 0) throw new Error(`${unet.file}: the model has no outputs`);
  vae.input('latent_sample');
  if (vae.outputs.size === 0) throw new Error(`${vae.file}: the model has no outputs`);
}

/**
 * optimum exports SDXL's text encoders with every layer's hidden state as `hidden_states.0` ..
 * `hidden_states.N` after their other outputs, and its pipeline takes `outputs[-2]`, the
 * penultimate layer; the pooled output is `outputs[0]` (text_embeds of the second encoder).
 */
export function hiddenStateOutputs(te: OnnxModel): { penultimate: string | undefined; pooled: string } {
  const names = [...te.outputs.keys()];
  const layers = names.filter((n) => /^hidden_states\.\d+$/.test(n));
  return { penultimate: layers.length >= 2 ? names[names.length - 2] : undefined, pooled: names[0]! };
}
