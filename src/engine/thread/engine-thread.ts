import { parentPort, workerData } from 'node:worker_threads';
import { isAllocationFailure } from '../errors.js';
import { loadModel, type LoadedModel } from '../model.js';
import { StableDiffusionPipeline, type GenerateOptions, type GenerateParams, type Generation } from '../pipeline.js';
import { TestPipeline } from '../testing/test-pipeline.js';
import type { FromThread, SerializedError, ThreadInit, ToThread } from './protocol.js';

/**
 * The engine's thread. onnxruntime-node runs inference synchronously on the calling thread, so
 * a UNet step on CPU would block its process for seconds: here it blocks only this thread,
 * and the host's event loop stays free to renew job locks and answer health checks.
 */

if (!parentPort) throw new Error('engine-thread.ts must run as a worker thread');
const port = parentPort;
const init = workerData as ThreadInit;
const post = (msg: FromThread, transfer: ArrayBuffer[] = []) => port.postMessage(msg, transfer);

function serializeError(err: unknown): SerializedError {
  const e = err instanceof Error ? err : new Error(typeof err === 'string' ? err : 'non-Error value thrown');
  // Allocation failures keep their text but are named for the host, whatever raised them.
  const name = isAllocationFailure(e) ? 'OutOfMemoryError' : e.name;
  return { name, message: e.message, ...(e.stack ? { stack: e.stack } : {}) };
}

const active = new Map<number, AbortController>();
let model: LoadedModel | undefined;
let pipeline: { generate(params: GenerateParams, options: GenerateOptions): Promise<Generation> } | undefined;

async function generate(msg: Extract<ToThread, { type: 'generate' }>): Promise<void> {
  const controller = new AbortController();
  active.set(msg.id, controller);
  post({ type: 'started', id: msg.id });
  try {
    const generation = await pipeline!.generate(msg.params, {
      signal: controller.signal,
      previewEvery: msg.previewEvery,
      returnLatents: msg.returnLatents,
      onProgress: (progress) => post({ type: 'progress', id: msg.id, progress }),
    });
    for (const w of generation.warnings) post({ type: 'log', level: 'warn', msg: w, id: msg.id });
    // Small Buffers share Node's allocation pool: copy into an ArrayBuffer of our own, which
    // can be transferred instead of cloned without detaching the pool.
    const png = new Uint8Array(generation.png);
    const more = (generation.more ?? []).map((m) => ({ seed: m.seed, png: new Uint8Array(m.png) }));
    post(
      {
        type: 'done',
        id: msg.id,
        generation: { ...generation, png: png as Buffer, ...(generation.more ? { more: more as Array<{ seed: number; png: Buffer }> } : {}) },
      },
      [png.buffer, ...more.map((m) => m.png.buffer)],
    );
  } catch (err) {
    post({ type: 'failed', id: msg.id, error: serializeError(err) });
  } finally {
    active.delete(msg.id);
  }
}

port.on('message', (msg: ToThread) => {
  switch (msg.type) {
    case 'generate':
      void generate(msg);
      break;
    case 'cancel':
      active.get(msg.id)?.abort();
      break;
    case 'close':
      for (const c of active.values()) c.abort();
      void (async () => {
        await model?.release().catch(() => undefined);
        post({ type: 'closed' });
        port.close();
      })();
      break;
  }
});

if (init.kind === 'test') {
  pipeline = new TestPipeline({ stepMs: init.stepMs });
  // The double takes (and ignores) input pictures and masks, so the service's paths for them can be tested.
  const inputs = { family: 'test' as const, inpainting: false, imageInputs: true };
  post({ type: 'ready', info: { modelDir: 'test-engine', provider: 'none', defaultScheduler: 'pndm', inputs, loadMs: 0, sizeBytes: 0 } });
} else {
  await loadOnnx(init);
}

async function loadOnnx(onnx: Extract<ThreadInit, { kind: 'onnx' }>): Promise<void> {
  try {
    model = await loadModel(onnx.modelDir, {
      provider: onnx.provider,
      ...(onnx.threads ? { threads: onnx.threads } : {}),
      log: (msg) => post({ type: 'log', level: msg.startsWith('warning: ') ? 'warn' : 'info', msg }),
    });
    pipeline = new StableDiffusionPipeline(model);
    post({
      type: 'ready',
      info: {
        modelDir: model.dir,
        provider: model.provider,
        defaultScheduler: model.defaultScheduler,
        variant: model.variant.name,
        defaults: model.defaults,
        inputs: { family: model.variant.family, inpainting: model.variant.inpainting, imageInputs: model.hasVaeEncoder },
        loadMs: model.loadMs,
        sizeBytes: model.sizeBytes,
      },
    });
  } catch (err) {
    post({ type: 'boot-failed', error: serializeError(err) });
  }
}
