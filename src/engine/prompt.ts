import { hiddenStateOutputs, type LoadedModel } from './model.js';
import { intTensor, type OnnxModel } from './onnx/runtime.js';
import type { ResolvedParams } from './params.js';
import type { ClipTokenizer } from './tokenizer.js';

/**
 * Prompt embeddings as the UNet takes them, the unconditional (negative) ones first:
 *
 * - SD 1.x/2.x (diffusers' OnnxStableDiffusionPipeline._encode_prompt): the text encoder's
 *   last_hidden_state.
 * - SDXL (optimum's StableDiffusionXLPipelineMixin._encode_prompt): both encoders'
 *   penultimate hidden states, concatenated along the feature axis, and the second encoder's
 *   pooled `text_embeds`. An absent negative prompt gives zeros when the model index says
 *   force_zeros_for_empty_prompt (SDXL's default); an empty string is encoded like any prompt.
 */

export interface PromptEmbeddings {
  /** [seq, hidden] each. */
  cond: Float32Array;
  uncond?: Float32Array;
  seq: number;
  hidden: number;
  /** SDXL: the pooled embedding the UNet takes as text_embeds, [pooledDim] each. */
  pooled?: Float32Array;
  uncondPooled?: Float32Array;
}

interface Encoded {
  hidden: Float32Array;
  seq: number;
  pooled?: Float32Array;
}

export async function encodePrompt(model: LoadedModel, p: ResolvedParams, withUncond: boolean, warnings: string[]): Promise<PromptEmbeddings> {
  const encode = model.variant.family === 'sdxl' ? encodeXl : encodeSd;
  const cond = await encode(model, p.prompt, 'prompt', warnings);
  let uncond: Encoded | undefined;
  if (withUncond) {
    uncond =
      model.variant.family === 'sdxl' && p.negativePromptAbsent && model.forceZerosForEmptyPrompt
        ? { hidden: new Float32Array(cond.hidden.length), seq: cond.seq, pooled: new Float32Array(cond.pooled!.length) }
        : await encode(model, p.negativePrompt, 'negative prompt', warnings);
  }
  return {
    cond: cond.hidden,
    seq: cond.seq,
    hidden: cond.hidden.length / cond.seq,
    ...(uncond ? { uncond: uncond.hidden } : {}),
    ...(cond.pooled ? { pooled: cond.pooled } : {}),
    ...(uncond?.pooled ? { uncondPooled: uncond.pooled } : {}),
  };
}

async function encodeSd(model: LoadedModel, text: string, what: string, warnings: string[]): Promise<Encoded> {
  const te = model.textEncoder;
  const out = te.outputs.has('last_hidden_state') ? 'last_hidden_state' : [...te.outputs.keys()][0]!;
  const { ids } = tokenize(model.tokenizer, text, what, warnings);
  const hidden = (await runEncoder(te, ids, [out]))[out]!;
  return { hidden, seq: ids.length };
}

async function encodeXl(model: LoadedModel, text: string, what: string, warnings: string[]): Promise<Encoded> {
  const pairs: Array<[ClipTokenizer, OnnxModel]> = [
    [model.tokenizer, model.textEncoder],
    [model.tokenizer2!, model.textEncoder2!],
  ];
  const hiddens: Float32Array[] = [];
  let pooled: Float32Array | undefined;
  let seq = 0;
  for (const [i, [tokenizer, te]] of pairs.entries()) {
    // Both tokenizers see the same text; one truncation warning says it.
    const { ids } = tokenize(tokenizer, text, what, i === 0 ? warnings : []);
    const names = hiddenStateOutputs(te);
    const out = await runEncoder(te, ids, [names.pooled, names.penultimate!]);
    hiddens.push(out[names.penultimate!]!);
    // The second encoder's pooled output wins, as in optimum's loop.
    pooled = out[names.pooled]!;
    seq = ids.length;
  }
  return { hidden: concatFeatures(hiddens, seq), seq, pooled: pooled! };
}

function tokenize(tokenizer: ClipTokenizer, text: string, what: string, warnings: string[]) {
  const enc = tokenizer.encode(text);
  if (enc.truncated) {
    warnings.push(`${what} truncated to ${tokenizer.modelMaxLength - 2} tokens: ${enc.droppedTokens} tokens dropped ("${enc.droppedText}")`);
  }
  return enc;
}

function runEncoder(te: OnnxModel, ids: Int32Array, outputs: string[]) {
  return te.run({ input_ids: intTensor(te.input('input_ids'), ids, [1, ids.length]) }, outputs);
}

/** [seq, d1] and [seq, d2] -> [seq, d1 + d2] (numpy's concatenate along the last axis). */
function concatFeatures(parts: Float32Array[], seq: number): Float32Array {
  const widths = parts.map((p) => p.length / seq);
  const total = widths.reduce((a, b) => a + b, 0);
  const out = new Float32Array(seq * total);
  for (let s = 0; s < seq; s++) {
    let at = s * total;
    for (const [k, part] of parts.entries()) {
      const d = widths[k]!;
      out.set(part.subarray(s * d, (s + 1) * d), at);
      at += d;
    }
  }
  return out;
}
