import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { TensorType } from './onnx/runtime.js';
import { detectVariant } from './variant.js';

/**
 * A cheap look at a Stable Diffusion ONNX export without loading it: the layout model.ts
 * expects, each component's declared inputs and outputs (read from the ONNX protobuf by walking
 * its fields and skipping the weights, so a 3 GB UNet costs a few hundred small reads and no
 * memory), and from those which variant it is. `t2i doctor` reports it; loading the model in a
 * worker remains the full check.
 */

export interface TensorInfo {
  name: string;
  /** float32, float16, int32, int64, ... or `elem_type N` for others. */
  type: string;
  /** Declared dimensions: numbers, or names for symbolic ones. */
  dims: (number | string)[];
}

export interface ComponentInfo {
  file: string;
  bytes: number;
  inputs: TensorInfo[];
  outputs: TensorInfo[];
}

export interface ModelReport {
  dir: string;
  problems: string[];
  components: Partial<Record<'text_encoder' | 'unet' | 'vae_decoder', ComponentInfo>>;
  /** e.g. "SD 1.x (text encoder width 768), fp16 UNet, epsilon prediction, PNDMScheduler, 64x64 latents (512x512 images)". */
  variant: string | undefined;
  totalBytes: number;
}

const ELEM_TYPES: Record<number, string> = {
  1: 'float32',
  2: 'uint8',
  3: 'int8',
  6: 'int32',
  7: 'int64',
  9: 'bool',
  10: 'float16',
  11: 'float64',
  16: 'bfloat16',
};

/** Positional reads through a small window: a protobuf walk touches only tags and lengths. */
class FileReader {
  private buf = Buffer.alloc(0);
  private bufStart = 0;
  constructor(
    private readonly fd: number,
    readonly size: number,
  ) {}
  bytes(at: number, n: number): Buffer {
    if (at < this.bufStart || at + n > this.bufStart + this.buf.length) {
      const want = Math.max(n, 64 * 1024);
      const b = Buffer.alloc(Math.min(want, this.size - at));
      readSync(this.fd, b, 0, b.length, at);
      this.buf = b;
      this.bufStart = at;
    }
    return this.buf.subarray(at - this.bufStart, at - this.bufStart + n);
  }
  varint(at: number): [value: number, next: number] {
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      const byte = this.bytes(at + i, 1)[0]!;
      result += (byte & 0x7f) * mul;
      mul *= 128;
      if (byte < 0x80) return [result, at + i + 1];
    }
    throw new Error('malformed varint');
  }
}

/** Calls `visit(field, start, end)` for each length-delimited field of the message in [start, end); skips the rest. */
function walk(r: FileReader, start: number, end: number, visit: (field: number, start: number, end: number) => void): void {
  let at = start;
  while (at < end) {
    const [key, afterKey] = r.varint(at);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) at = r.varint(afterKey)[1];
    else if (wire === 1) at = afterKey + 8;
    else if (wire === 5) at = afterKey + 4;
    else if (wire === 2) {
      const [len, dataStart] = r.varint(afterKey);
      if (dataStart + len > end) throw new Error(`field ${field} runs past the end of its message`);
      visit(field, dataStart, dataStart + len);
      at = dataStart + len;
    } else throw new Error(`unsupported protobuf wire type ${wire}`);
  }
}

function varintFields(r: FileReader, start: number, end: number): Map<number, number> {
  const out = new Map<number, number>();
  let at = start;
  while (at < end) {
    const [key, afterKey] = r.varint(at);
    const wire = key & 7;
    if (wire === 0) {
      const [v, next] = r.varint(afterKey);
      out.set(Math.floor(key / 8), v);
      at = next;
    } else if (wire === 2) at = r.varint(afterKey)[1] + r.varint(afterKey)[0];
    else if (wire === 1) at = afterKey + 8;
    else at = afterKey + 4;
  }
  return out;
}

/** ValueInfoProto: name (1), type (2) -> tensor_type (1) -> elem_type (1), shape (2) -> dim (1) -> dim_value (1) | dim_param (2). */
function valueInfo(r: FileReader, start: number, end: number): TensorInfo {
  const info: TensorInfo = { name: '', type: 'unknown', dims: [] };
  walk(r, start, end, (f, s, e) => {
    if (f === 1) info.name = r.bytes(s, e - s).toString('utf8');
    if (f !== 2) return;
    walk(r, s, e, (tf, ts, te) => {
      if (tf !== 1) return;
      const elem = varintFields(r, ts, te).get(1);
      if (elem !== undefined) info.type = ELEM_TYPES[elem] ?? `elem_type ${elem}`;
      walk(r, ts, te, (sf, ss, se) => {
        if (sf !== 2) return;
        walk(r, ss, se, (df, ds, de) => {
          if (df !== 1) return;
          let dim: number | string = -1;
          const v = varintFields(r, ds, de).get(1);
          if (v !== undefined) dim = v;
          walk(r, ds, de, (pf, ps, pe) => {
            if (pf === 2) dim = r.bytes(ps, pe - ps).toString('utf8');
          });
          info.dims.push(dim);
        });
      });
    });
  });
  return info;
}

/** Graph inputs (field 11) and outputs (12) of an ONNX file; initializers listed as inputs (old exporters) are left out. */
export function onnxSignature(file: string): ComponentInfo {
  const size = statSync(file).size;
  const fd = openSync(file, 'r');
  try {
    const r = new FileReader(fd, size);
    const inputs: TensorInfo[] = [];
    const outputs: TensorInfo[] = [];
    const initializers = new Set<string>();
    let graphs = 0;
    walk(r, 0, size, (field, s, e) => {
      if (field !== 7) return; // ModelProto.graph
      graphs++;
      walk(r, s, e, (gf, gs, ge) => {
        if (gf === 11) inputs.push(valueInfo(r, gs, ge));
        else if (gf === 12) outputs.push(valueInfo(r, gs, ge));
        else if (gf === 5) {
          // TensorProto.name is field 8; read it without touching the weights.
          walk(r, gs, ge, (tf, ts, te) => {
            if (tf === 8) initializers.add(r.bytes(ts, te - ts).toString('utf8'));
          });
        }
      });
    });
    if (graphs === 0) throw new Error('no graph in the file');
    return { file, bytes: size, inputs: inputs.filter((i) => !initializers.has(i.name)), outputs };
  } finally {
    closeSync(fd);
  }
}

async function jsonObject(file: string, what: string, problems: string[]): Promise<Record<string, unknown> | undefined> {
  if (!existsSync(file)) {
    problems.push(`${file}: file not found (expected ${what})`);
    return undefined;
  }
  try {
    const v: unknown = JSON.parse(await readFile(file, 'utf8'));
    if (v && typeof v === 'object' && !Array.isArray(v)) return v as Record<string, unknown>;
    problems.push(`${file}: expected ${what} (a JSON object)`);
  } catch (err) {
    problems.push(`${file}: not valid JSON (${(err as Error).message}); expected ${what}`);
  }
  return undefined;
}

const COMPONENTS = ['text_encoder', 'unet', 'vae_decoder'] as const;
const EXTERNAL_WEIGHTS = ['model.onnx_data', 'weights.pb'];

/** Checks an export's layout and signatures; every problem names its file and what was expected. */
export async function inspectModel(dir: string): Promise<ModelReport> {
  const root = path.resolve(dir);
  const report: ModelReport = { dir: root, problems: [], components: {}, variant: undefined, totalBytes: 0 };
  if (!existsSync(root) || !statSync(root).isDirectory()) {
    report.problems.push(`${root}: model directory not found`);
    return report;
  }
  const modelIndex = await jsonObject(path.join(root, 'model_index.json'), 'a diffusers model index', report.problems);
  const scheduler = await jsonObject(path.join(root, 'scheduler', 'scheduler_config.json'), 'a diffusers scheduler config', report.problems);
  for (const f of ['vocab.json', 'merges.txt']) {
    const p = path.join(root, 'tokenizer', f);
    if (!existsSync(p)) report.problems.push(`${p}: file not found (expected the CLIP tokenizer's ${f})`);
  }
  for (const c of COMPONENTS) {
    const file = path.join(root, c, 'model.onnx');
    if (!existsSync(file)) {
      report.problems.push(`${file}: file not found (expected the ${c} ONNX model)`);
      continue;
    }
    try {
      const info = onnxSignature(file);
      for (const w of EXTERNAL_WEIGHTS) if (existsSync(path.join(root, c, w))) info.bytes += statSync(path.join(root, c, w)).size;
      report.components[c] = info;
      report.totalBytes += info.bytes;
    } catch (err) {
      report.problems.push(`${file}: not a readable ONNX model (${(err as Error).message})`);
    }
  }
  checkSignatures(report);
  if (report.problems.length === 0) {
    // The same decision loading makes (variant.ts), from the signatures read here.
    try {
      const unet = report.components.unet!;
      const variant = detectVariant({
        dir: root,
        modelIndex: modelIndex ?? {},
        schedulerConfig: scheduler ?? {},
        unetConfig: await optionalJson(path.join(root, 'unet', 'config.json'), report.problems),
        vaeConfig: {},
        components: new Set(
          ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder'].filter((c) => existsSync(path.join(root, c, 'model.onnx'))),
        ),
        unetFile: unet.file,
        unetInputs: new Map(unet.inputs.map((i) => [i.name, { name: i.name, type: i.type as TensorType, shape: i.dims }])),
        hiddenSize: hiddenSizeOf(unet),
      });
      report.variant = describeVariant(report, scheduler ?? {}, variant.name);
    } catch (err) {
      report.problems.push((err as Error).message);
    }
  }
  return report;
}

function hiddenSizeOf(unet: ComponentInfo): number | undefined {
  const d = unet.inputs.find((i) => i.name === 'encoder_hidden_states')?.dims[2];
  return typeof d === 'number' ? d : undefined;
}

async function optionalJson(file: string, problems: string[]): Promise<Record<string, unknown>> {
  return existsSync(file) ? ((await jsonObject(file, 'a UNet config', problems)) ?? {}) : {};
}

function checkSignatures(report: ModelReport): void {
  const want = (c: keyof ModelReport['components'], name: string, types: string[]) => {
    const info = report.components[c];
    if (!info) return undefined;
    const t = info.inputs.find((i) => i.name === name);
    if (!t) report.problems.push(`${info.file}: expected an input named "${name}", found ${info.inputs.map((i) => i.name).join(', ') || 'none'}`);
    else if (!types.includes(t.type)) report.problems.push(`${info.file}: ${name} is ${t.type}; expected ${types.join(' or ')}`);
    return t;
  };
  want('text_encoder', 'input_ids', ['int32', 'int64']);
  want('unet', 'sample', ['float32', 'float16']);
  want('unet', 'encoder_hidden_states', ['float32', 'float16']);
  const t = want('unet', 'timestep', ['int64', 'int32', 'float32', 'float16', 'float64']);
  if (t && t.dims.length > 1) report.problems.push(`${report.components.unet!.file}: timestep has rank ${t.dims.length}; expected a scalar or shape [1]`);
  want('vae_decoder', 'latent_sample', ['float32', 'float16']);
  for (const c of COMPONENTS) {
    const info = report.components[c];
    if (info && info.outputs.length === 0) report.problems.push(`${info.file}: the model has no outputs`);
  }
}

function describeVariant(report: ModelReport, scheduler: Record<string, unknown>, family: string): string {
  const te = report.components.text_encoder!;
  const unet = report.components.unet!;
  const hidden = (te.outputs.find((o) => o.name === 'last_hidden_state') ?? te.outputs[0])?.dims.at(-1);
  const sample = unet.inputs.find((i) => i.name === 'sample')!;
  const [h, w] = [sample.dims[2], sample.dims[3]];
  const size = typeof h === 'number' && typeof w === 'number' ? `, ${h}x${w} latents (${h * 8}x${w * 8} images)` : ', latent size not fixed';
  const ids = te.inputs.find((i) => i.name === 'input_ids')!.type;
  const timestep = unet.inputs.find((i) => i.name === 'timestep')!.type;
  const prediction = typeof scheduler.prediction_type === 'string' ? scheduler.prediction_type : 'epsilon';
  const cls = typeof scheduler._class_name === 'string' ? scheduler._class_name : 'unknown scheduler';
  return `${family} (text encoder width ${String(hidden)}), ${sample.type === 'float16' ? 'fp16' : 'fp32'} UNet, ${prediction} prediction, ${cls}${size}, input_ids ${ids}, timestep ${timestep}`;
}
