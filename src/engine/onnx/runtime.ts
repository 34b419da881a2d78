import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { float32ToHalfBits, halfBitsToFloat32 } from '../float16.js';

/**
 * The only module that imports onnxruntime-node. It chooses execution providers, opens
 * sessions from file paths (so external weight files next to a model are found), reads each
 * input's dtype and rank from the session instead of assuming them, and converts float32
 * arrays to and from whatever the model declares.
 */

export const PROVIDERS = ['auto', 'cuda', 'coreml', 'cpu'] as const;
export type ProviderChoice = (typeof PROVIDERS)[number];
export type Provider = Exclude<ProviderChoice, 'auto'>;

export type TensorType = 'float32' | 'float16' | 'int32' | 'int64' | 'float64';

export interface IoSpec {
  name: string;
  type: TensorType;
  /** Dimensions as declared; symbolic ones are strings, unknown ones -1. */
  shape: Array<number | string>;
}

/**
 * Providers this installation can use. CUDA needs onnxruntime-node's CUDA provider library,
 * which its install script downloads (skipped by default here, see README "Execution providers and CUDA"); CoreML
 * exists only in the macOS build.
 */
export function availableProviders(): Provider[] {
  const out: Provider[] = [];
  if (process.platform === 'linux' && cudaProviderLibraryPresent()) out.push('cuda');
  if (process.platform === 'darwin') out.push('coreml');
  out.push('cpu');
  return out;
}

function cudaProviderLibraryPresent(): boolean {
  const dir = bindingDir();
  return dir !== undefined && existsSync(path.join(dir, CUDA_PROVIDER_LIBRARY));
}

/** The CUDA provider library onnxruntime-node's install script puts beside the binding. */
export const CUDA_PROVIDER_LIBRARY = 'libonnxruntime_providers_cuda.so';

/** The folder of the native binding for this platform (libonnxruntime, the add-on, provider libraries), if the package is installed. */
export function bindingDir(): string | undefined {
  try {
    const require = createRequire(import.meta.url);
    const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
    return path.join(pkg, 'bin', 'napi-v6', process.platform, process.arch);
  } catch {
    return undefined;
  }
}

/** onnxruntime's version and the execution providers its binding was built with (`bundled: false`: a separate library, e.g. CUDA). */
export function runtimeInfo(): { version: string; backends: { name: string; bundled: boolean }[] } {
  return { version: ort.env.versions.node ?? ort.env.versions.common, backends: ort.listSupportedBackends() };
}

/** The order `auto` tries providers in. */
export function providerCandidates(choice: ProviderChoice): Provider[] {
  const available = availableProviders();
  if (choice === 'auto') return available;
  if (!available.includes(choice)) {
    throw new Error(`execution provider "${choice}" is not available here; available: ${available.join(', ')}`);
  }
  return [choice];
}

export type GraphOptimization = 'disabled' | 'basic' | 'extended' | 'all';

/**
 * `extended`, not `all`: on CPU, `all` adds the NCHWc layout transform, which keeps a reordered
 * second copy of every convolution weight. Measured with `t2i bench` on a 227 MB model: peak
 * RSS 2.2x the model size with `all`, 1.8x with `extended`, at the same speed.
 */
export const DEFAULT_OPTIMIZATION: GraphOptimization = 'extended';

export interface SessionOptions {
  /** intra-op threads per session; onnxruntime's default (all cores) when unset. */
  threads?: number;
  optimization?: GraphOptimization;
}

export class OnnxModel {
  readonly inputs: ReadonlyMap<string, IoSpec>;
  readonly outputs: ReadonlyMap<string, IoSpec>;
  /** Wall time spent inside session.run, summed over the model's lifetime (for benchmarks). */
  runMs = 0;
  runs = 0;

  private constructor(
    readonly file: string,
    readonly provider: Provider,
    private readonly session: ort.InferenceSession,
  ) {
    this.inputs = new Map(session.inputMetadata.map((m) => [m.name, ioSpec(file, m)]));
    this.outputs = new Map(session.outputMetadata.map((m) => [m.name, ioSpec(file, m)]));
  }

  static async open(file: string, provider: Provider, options: SessionOptions = {}): Promise<OnnxModel> {
    if (!existsSync(file)) throw new Error(`${file}: file not found (expected an ONNX model)`);
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(file, {
        executionProviders: [provider],
        graphOptimizationLevel: options.optimization ?? DEFAULT_OPTIMIZATION,
        ...(options.threads ? { intraOpNumThreads: options.threads } : {}),
      });
    } catch (err) {
      throw new Error(`${file}: onnxruntime could not load it with the ${provider} provider: ${(err as Error).message}`, { cause: err });
    }
    return new OnnxModel(file, provider, session);
  }

  input(name: string): IoSpec {
    const spec = this.inputs.get(name);
    if (!spec) throw new Error(`${this.file}: expected an input named "${name}", found ${[...this.inputs.keys()].join(', ')}`);
    return spec;
  }

  output(name: string): IoSpec {
    const spec = this.outputs.get(name);
    if (!spec) throw new Error(`${this.file}: expected an output named "${name}", found ${[...this.outputs.keys()].join(', ')}`);
    return spec;
  }

  /**
   * Runs the model. Float inputs are given as float32 and converted to the declared dtype;
   * float outputs come back as float32 whatever the model produces.
   */
  async run(feeds: Record<string, ort.Tensor>, outputNames: string[]): Promise<Record<string, Float32Array>> {
    const started = performance.now();
    let result: ort.InferenceSession.OnnxValueMapType;
    try {
      result = await this.session.run(feeds, outputNames);
    } catch (err) {
      // Name every input's dtype and dims: most failures are a mismatch with the export.
      const described = Object.entries(feeds)
        .map(([k, t]) => `${k}: ${t.type}[${t.dims.join(', ')}]`)
        .join('; ');
      throw new Error(`${this.file}: inference failed (${(err as Error).message}); inputs were ${described}`, { cause: err });
    } finally {
      this.runMs += performance.now() - started;
      this.runs++;
    }
    const out: Record<string, Float32Array> = {};
    for (const name of outputNames) {
      const t = result[name];
      if (!t) throw new Error(`${this.file}: output "${name}" missing from the result`);
      out[name] = tensorToFloat32(t);
    }
    return out;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

function ioSpec(file: string, m: ort.InferenceSession.ValueMetadata): IoSpec {
  if (!m.isTensor) throw new Error(`${file}: "${m.name}" is not a tensor; Stable Diffusion models take and return tensors`);
  const type = m.type as string;
  if (!['float32', 'float16', 'int32', 'int64', 'float64'].includes(type)) {
    throw new Error(`${file}: "${m.name}" has dtype ${type}; expected float32, float16, int32 or int64`);
  }
  return { name: m.name, type: type as TensorType, shape: m.shape.map((d) => (typeof d === 'number' ? d : (d ?? -1))) };
}

/** A float tensor of the dtype `spec` declares, from float32 (or float64) data. */
export function floatTensor(spec: IoSpec, data: Float32Array | Float64Array, dims: number[]): ort.Tensor {
  switch (spec.type) {
    case 'float32':
      return new ort.Tensor('float32', data instanceof Float32Array ? data : Float32Array.from(data), dims);
    case 'float16':
      return new ort.Tensor('float16', float32ToHalfBits(data), dims);
    case 'float64':
      return new ort.Tensor('float64', Float64Array.from(data), dims);
    default:
      throw new Error(`"${spec.name}" is declared ${spec.type}; expected a float type`);
  }
}

/** An integer tensor (token ids, integer timesteps) of the dtype `spec` declares. */
export function intTensor(spec: IoSpec, data: ArrayLike<number>, dims: number[]): ort.Tensor {
  switch (spec.type) {
    case 'int32':
      return new ort.Tensor('int32', Int32Array.from(data), dims);
    case 'int64':
      return new ort.Tensor('int64', BigInt64Array.from(Array.from(data, (v) => BigInt(v))), dims);
    default:
      throw new Error(`"${spec.name}" is declared ${spec.type}; expected int32 or int64`);
  }
}

/**
 * A timestep in whatever dtype and rank the UNet declares. Integer dtypes truncate toward
 * zero, as numpy's `np.array([t], dtype=np.int64)` does in diffusers' ONNX pipeline.
 */
export function timestepTensor(spec: IoSpec, t: number): ort.Tensor {
  const dims = spec.shape.length === 0 ? [] : [1];
  if (spec.type === 'int64' || spec.type === 'int32') return intTensor(spec, [Math.trunc(t)], dims);
  return floatTensor(spec, Float64Array.of(t), dims);
}

function tensorToFloat32(t: ort.Tensor): Float32Array {
  switch (t.type) {
    case 'float32':
      return t.data as Float32Array;
    case 'float16':
      return halfBitsToFloat32(t.data as Uint16Array);
    case 'float64':
      return Float32Array.from(t.data as Float64Array);
    default:
      throw new Error(`expected a float output, got ${t.type}`);
  }
}

export type { ort };
