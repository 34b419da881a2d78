import { parentPort, workerData } from 'node:worker_threads';
import { isAllocationFailure } from '../errors.js';
import { loadModel, type LoadedModel } from '../model.js';
import { StableDiffusionPipeline } from '../pipeline.js';
import { TestPipeline } from '../testing/test-pipeline.js';
import { Batcher, type BatchingPipeline, type Planned } from './batcher.js';
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

let model: LoadedModel | undefined;
// The host sends generations only once the thread said it is ready, which is after this is set.
let batcher: Batcher<Planned> | undefined;

function start(pipeline: BatchingPipeline<Planned>): void {
  batcher = new Batcher(pipeline, init.batchWaitMs, {
    started: (id, batchSize) => post({ type: 'started', id, batchSize }),
    progress: (id, progress) => post({ type: 'progress', id, progress }),
    done: (id, generation) => {
      for (const w of generation.warnings) post({ type: 'log', level: 'warn', msg: w, id });
      // Small Buffers share Node's allocation pool: copy into an ArrayBuffer of our own, which
      // can be transferred instead of cloned without detaching the pool.
      const png = new Uint8Array(generation.png);
      const more = generation.more?.map((m) => ({ seed: m.seed, png: new Uint8Array(m.png) }));
      post({ type: 'done', id, generation: { ...generation, png: png as Buffer, ...(more ? { more: more as Array<{ seed: number; png: Buffer }> } : {}) } }, [
        png.buffer,
        ...(more ?? []).map((m) => m.png.buffer),
      ]);
    },
    failed: (id, error) => post({ type: 'failed', id, error: serializeError(error) }),
  });
}

port.on('message', (msg: ToThread) => {
  switch (msg.type) {
    case 'generate':
      void batcher!.submit({ id: msg.id, params: msg.params, previewEvery: msg.previewEvery, returnLatents: msg.returnLatents, alone: msg.alone });
      break;
    case 'cancel':
      batcher!.cancel(msg.id);
      break;
    case 'close':
      batcher?.close();
      void (async () => {
        await model?.release().catch(() => undefined);
        post({ type: 'closed' });
        port.close();
      })();
      break;
  }
});

if (init.kind === 'test') {
  const pipeline = new TestPipeline({ stepMs: init.stepMs, batchMax: init.batchMax });
  start(pipeline);
  const batching = { max: pipeline.batching.max, summary: `batching: up to ${pipeline.batching.max} generations per step (test engine)` };
  // The double takes (and ignores) input pictures and masks, so the service's paths for them can be tested.
  const inputs = { family: 'test' as const, inpainting: false, imageInputs: true };
  post({ type: 'ready', info: { modelDir: 'test-engine', provider: 'none', defaultScheduler: 'pndm', inputs, loadMs: 0, sizeBytes: 0, batching } });
} else {
  await loadOnnx(init);
}

async function loadOnnx(onnx: Extract<ThreadInit, { kind: 'onnx' }>): Promise<void> {
  try {
    const log = (msg: string) => post({ type: 'log', level: msg.startsWith('warning: ') ? 'warn' : 'info', msg });
    model = await loadModel(onnx.modelDir, { provider: onnx.provider, ...(onnx.threads ? { threads: onnx.threads } : {}), log });
    const pipeline = new StableDiffusionPipeline(model, { max: onnx.batchMax, threads: onnx.threads });
    log(pipeline.batching.summary);
    start(pipeline);
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
        batching: { max: pipeline.batching.max, summary: pipeline.batching.summary },
      },
    });
  } catch (err) {
    post({ type: 'boot-failed', error: serializeError(err) });
  }
}
