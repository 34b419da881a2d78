import onnxProto from 'onnx-proto';

/**
 * A small ONNX graph builder for the models the project generates itself (no weights can be
 * downloaded here). It writes plain ONNX protobuf with opset 17, which onnxruntime-node and
 * diffusers' OnnxRuntimeModel both load.
 */

const { onnx } = onnxProto;
type DataType = onnxProto.onnx.TensorProto.DataType;
export const DT = onnx.TensorProto.DataType;

export type ElemType = 'float32' | 'float16' | 'int32' | 'int64' | 'bool';
export const ELEM: Record<ElemType, DataType> = {
  float32: DT.FLOAT,
  float16: DT.FLOAT16,
  int32: DT.INT32,
  int64: DT.INT64,
  bool: DT.BOOL,
};

export type Dim = number | string;
/** Integers become INT attributes; wrap a float that happens to be integral as `{ float: 1 }`. */
type AttrValue = number | number[] | string | { float: number } | { tensor: onnxProto.onnx.ITensorProto };

export interface SerializeOptions {
  /**
   * Store initializers of at least this many bytes in a side file (`model.onnx_data`), as
   * exports over 2 GB must. The model must then be opened from its path so onnxruntime finds
   * the side file.
   */
  externalDataFile?: string;
  externalThresholdBytes?: number;
}

export interface SerializedModel {
  model: Uint8Array;
  /** Contents of the external data file, when one was requested. */
  externalData?: Uint8Array;
}

export class GraphBuilder {
  private readonly nodes: onnxProto.onnx.INodeProto[] = [];
  private readonly initializers: onnxProto.onnx.ITensorProto[] = [];
  private readonly inputs: onnxProto.onnx.IValueInfoProto[] = [];
  private readonly outputs: onnxProto.onnx.IValueInfoProto[] = [];
  private counter = 0;

  constructor(private readonly name: string) {}

  private fresh(prefix: string): string {
    return `${prefix}_${this.counter++}`;
  }

  input(name: string, type: ElemType, shape: Dim[]): string {
    this.inputs.push(valueInfo(name, type, shape));
    return name;
  }

  output(name: string, type: ElemType, shape: Dim[]): void {
    this.outputs.push(valueInfo(name, type, shape));
  }

  /** A float32 initializer. */
  f32(data: ArrayLike<number>, dims: number[], name = this.fresh('w')): string {
    const raw = Float32Array.from(data);
    this.initializers.push({ name, dataType: DT.FLOAT, dims, rawData: new Uint8Array(raw.buffer) });
    return name;
  }

  i64(data: ArrayLike<number>, dims: number[] = [data.length], name = this.fresh('c')): string {
    const raw = BigInt64Array.from(Array.from(data, (v) => BigInt(v)));
    this.initializers.push({ name, dataType: DT.INT64, dims, rawData: new Uint8Array(raw.buffer) });
    return name;
  }

  scalar(value: number): string {
    return this.f32([value], []);
  }

  /** Adds a node and returns its output name(s). */
  op(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, outputs = 1): string {
    return this.opN(opType, inputs, attrs, outputs)[0]!;
  }

  opN(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, outputs = 1): string[] {
    const outs = Array.from({ length: outputs }, () => this.fresh(opType.toLowerCase()));
    this.nodes.push({
      opType,
      name: this.fresh(`n_${opType}`),
      input: inputs,
      output: outs,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    return outs;
  }

  /** Renames the last produced value by routing it through Identity (graph outputs need fixed names). */
  named(value: string, name: string): string {
    this.nodes.push({ opType: 'Identity', name: this.fresh('n_Identity'), input: [value], output: [name] });
    return name;
  }

  serialize(options: SerializeOptions = {}): SerializedModel {
    let externalData: Uint8Array | undefined;
    if (options.externalDataFile) {
      const threshold = options.externalThresholdBytes ?? 1024;
      const chunks: Uint8Array[] = [];
      let offset = 0;
      for (const init of this.initializers) {
        const raw = init.rawData;
        if (!raw || raw.length < threshold) continue;
        chunks.push(raw);
        init.rawData = undefined;
        init.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL;
        init.externalData = [
          { key: 'location', value: options.externalDataFile },
          { key: 'offset', value: String(offset) },
          { key: 'length', value: String(raw.length) },
        ];
        offset += raw.length;
      }
      externalData = concatBytes(chunks, offset);
    }
    const model = onnx.ModelProto.create({
      irVersion: 8,
      producerName: 't2i make-test-models',
      opsetImport: [{ domain: '', version: 17 }],
      graph: {
        name: this.name,
        node: this.nodes,
        initializer: this.initializers,
        input: this.inputs,
        output: this.outputs,
      },
    });
    return { model: onnx.ModelProto.encode(model).finish(), externalData };
  }
}

function concatBytes(chunks: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function valueInfo(name: string, type: ElemType, shape: Dim[]): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ELEM[type],
        shape: { dim: shape.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

function attribute(name: string, v: AttrValue): onnxProto.onnx.IAttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof v === 'string') return { name, type: T.STRING, s: new TextEncoder().encode(v) };
  if (Array.isArray(v)) return { name, type: T.INTS, ints: v };
  if (typeof v === 'number') {
    return Number.isInteger(v) ? { name, type: T.INT, i: v } : { name, type: T.FLOAT, f: v };
  }
  if ('float' in v) return { name, type: T.FLOAT, f: v.float };
  return { name, type: T.TENSOR, t: v.tensor };
}
