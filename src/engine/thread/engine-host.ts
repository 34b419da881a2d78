import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { ProviderChoice } from '../onnx/runtime.js';
import type { GenerateParams, Generation, Progress } from '../pipeline.js';
import type { TestPipelineOptions } from '../testing/test-pipeline.js';
import type { EngineInfo, FromThread, SerializedError, ThreadInit, ToThread } from './protocol.js';

/**
 * The engine as the rest of the service sees it: a model loaded once in its own thread,
 * progress and cancellation across the thread boundary. Every generate() call goes to the
 * thread at once; the thread queues them and runs those that can share UNet runs together, up
 * to `batchMax` (thread/batcher.ts), so callers that want batches just call generate() for
 * several generations without waiting for each.
 *
 * It also watches the thread. If the thread dies (a native crash, an exhausted heap) or sends
 * nothing for `stallMs` while generations run (a hung kernel), the engine is down: every pending
 * generation fails with an EngineDownError saying how many ran together, the thread is
 * terminated, and `onDown` listeners hear why. A down engine stays down; whoever owns it starts
 * a new one (src/worker/engine.ts).
 */

interface CommonOptions {
  /** Lines the engine thread writes (provider choice, prompt truncation), with the generation they belong to. */
  log?: (level: 'debug' | 'info' | 'warn', msg: string, generationId?: number) => void;
  /**
   * A thread that sends nothing (no step, no result) for this long while generations run is
   * hung: the engine goes down. It must be longer than the slowest of a full batch's prompt
   * encodings plus one step, one step, and its decodings. 0 or absent: never.
   */
  stallMs?: number;
  /** Most generations per UNet run (BATCH_MAX); 1 or absent: one at a time. */
  batchMax?: number;
  /** Longest the first generation in line waits for others to share its batch (BATCH_WAIT_MS). */
  batchWaitMs?: number;
}

export type EngineOptions = CommonOptions &
  (
    | { modelDir: string; provider?: ProviderChoice; threads?: number }
    /** The test double (testing/test-pipeline.ts) instead of a model: for tests, the demo and benchmarks only. */
    | { test: TestPipelineOptions }
  );

export interface RunOptions {
  onProgress?: (progress: Progress) => void;
  signal?: AbortSignal;
  previewEvery?: number;
  returnLatents?: boolean;
  /** Called with the engine's id for this generation, so log lines can be matched to it. */
  onStart?: (generationId: number) => void;
  /** Receives the engine thread's lines about this generation (instead of EngineOptions.log), so they carry the job's context. */
  log?: EngineLog;
  /** Run in a batch of its own (a request for several images still batches its own images together). */
  alone?: boolean;
}

export type EngineLog = (level: 'debug' | 'info' | 'warn', msg: string) => void;

interface Pending {
  resolve: (g: Generation) => void;
  reject: (e: Error) => void;
  onProgress?: (p: Progress) => void;
  log?: EngineLog;
  onStart?: (generationId: number) => void;
  /** How many requests' generations left the thread's queue with this one's, itself included; undefined until they did. */
  batchSize?: number;
}

/** A generation's error from inside the thread (its name and message kept: InvalidParamsError, OutOfMemoryError, ...). */
export class EngineError extends Error {
  constructor(e: SerializedError) {
    super(e.message);
    this.name = e.name;
    if (e.stack) this.stack = e.stack;
  }
}

/** Why an engine went down: its thread exited or crashed, ran out of heap, or a generation hung. */
export type DownReason = 'crashed' | 'out_of_memory' | 'stalled';

/** The engine is down; the generation that was running (if any) did not finish because of it. */
export class EngineDownError extends Error {
  override name = 'EngineDownError';
  constructor(
    readonly reason: DownReason,
    message: string,
    /** A hung thread that did not stop when terminated: only ending the process frees it. */
    readonly unkillable = false,
    /**
     * How many requests were running together when it went down, this one included (a request
     * for several images counts once); 0 when this one was still waiting. Only a request that ran
     * alone can be blamed for the fall.
     */
    readonly batchSize = 0,
  ) {
    super(message);
  }
}

/** How long a terminated thread may take to stop before it counts as unkillable. */
const TERMINATE_TIMEOUT_MS = 5_000;

/**
 * Starts engine-thread in a worker. From compiled JavaScript it is loaded directly; from the
 * TypeScript sources (tests, `npm run t2i`) the worker first registers tsx's loader, which on
 * Node 20 a worker does not inherit from its parent.
 */
function spawnThread(init: ThreadInit): Worker {
  if (!import.meta.url.endsWith('.ts')) return new Worker(new URL('./engine-thread.js', import.meta.url), { workerData: init });
  // The ESM entry of tsx/esm/api (require.resolve would give the CommonJS one).
  const tsxDir = path.dirname(createRequire(import.meta.url).resolve('tsx/package.json'));
  const tsxApi = pathToFileURL(path.join(tsxDir, 'dist', 'esm', 'api', 'index.mjs')).href;
  const entry = new URL('./engine-thread.ts', import.meta.url).href;
  const boot = `import(${JSON.stringify(tsxApi)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
  return new Worker(boot, { eval: true, workerData: init });
}

function threadInit(options: EngineOptions): ThreadInit {
  const batch = { batchMax: options.batchMax ?? 1, batchWaitMs: options.batchWaitMs ?? 0 };
  if ('test' in options) return { kind: 'test', stepMs: options.test.stepMs, ...batch };
  return { kind: 'onnx', modelDir: options.modelDir, provider: options.provider ?? 'auto', ...(options.threads ? { threads: options.threads } : {}), ...batch };
}

export class Engine {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** performance.now() of the thread's last message. */
  private lastBeat = performance.now();
  private closed = false;
  private downReason: EngineDownError | undefined;
  private readonly downListeners: Array<(err: EngineDownError) => void> = [];
  private readonly watchdog: NodeJS.Timeout | undefined;

  private constructor(
    private readonly worker: Worker,
    readonly info: EngineInfo,
    private readonly options: EngineOptions,
  ) {
    worker.on('message', (msg: FromThread) => this.onMessage(msg));
    worker.on('error', (err: Error & { code?: string }) =>
      this.down(new EngineDownError(err.code === 'ERR_WORKER_OUT_OF_MEMORY' ? 'out_of_memory' : 'crashed', `engine thread failed: ${err.message}`)),
    );
    worker.on('exit', (code) => this.down(new EngineDownError('crashed', `engine thread exited with code ${code}`)));
    const stallMs = options.stallMs ?? 0;
    if (stallMs > 0) {
      this.watchdog = setInterval(() => this.checkStall(stallMs), Math.max(10, Math.min(1_000, stallMs / 4)));
      this.watchdog.unref();
    }
  }

  /** Starts the thread and resolves once the model is loaded (or rejects with why it could not be). */
  static start(options: EngineOptions): Promise<Engine> {
    const worker = spawnThread(threadInit(options));
    return new Promise((resolve, reject) => {
      const onBoot = (msg: FromThread) => {
        if (msg.type === 'log') options.log?.(msg.level, msg.msg);
        else if (msg.type === 'ready') {
          cleanup();
          resolve(new Engine(worker, msg.info, options));
        } else if (msg.type === 'boot-failed') {
          cleanup();
          void worker.terminate();
          reject(new EngineError(msg.error));
        }
      };
      const onError = (err: Error) => {
        cleanup();
        reject(err);
      };
      const onExit = (code: number) => {
        cleanup();
        reject(new Error(`engine thread exited with code ${code} while loading the model`));
      };
      const cleanup = () => {
        worker.off('message', onBoot);
        worker.off('error', onError);
        worker.off('exit', onExit);
      };
      worker.on('message', onBoot);
      worker.on('error', onError);
      worker.on('exit', onExit);
    });
  }

  get alive(): boolean {
    return !this.closed && !this.downReason;
  }

  /** Called once, when the engine goes down (not when it is closed). */
  onDown(listener: (err: EngineDownError) => void): void {
    if (this.downReason) listener(this.downReason);
    else this.downListeners.push(listener);
  }

  /** Hands a generation to the thread, which runs it alone or with others that fit its batch. */
  generate(params: GenerateParams, run: RunOptions = {}): Promise<Generation> {
    if (this.downReason) return Promise.reject(this.downReason);
    if (this.closed) return Promise.reject(new Error('engine is closed'));
    const id = this.nextId++;
    return new Promise<Generation>((resolve, reject) => {
      if (run.signal?.aborted) {
        const err = new Error('generation canceled');
        err.name = 'AbortError';
        reject(err);
        return;
      }
      const onAbort = () => this.send({ type: 'cancel', id });
      run.signal?.addEventListener('abort', onAbort, { once: true });
      const done = () => run.signal?.removeEventListener('abort', onAbort);
      this.pending.set(id, {
        resolve: (g) => {
          done();
          resolve(g);
        },
        reject: (e) => {
          done();
          reject(e);
        },
        ...(run.onProgress ? { onProgress: run.onProgress } : {}),
        ...(run.log ? { log: run.log } : {}),
        ...(run.onStart ? { onStart: run.onStart } : {}),
      });
      this.send({ type: 'generate', id, params, previewEvery: run.previewEvery ?? 0, returnLatents: run.returnLatents ?? false, alone: run.alone ?? false });
    });
  }

  private send(msg: ToThread): void {
    if (this.alive || msg.type === 'close') this.worker.postMessage(msg);
  }

  private onMessage(msg: FromThread): void {
    this.lastBeat = performance.now();
    switch (msg.type) {
      case 'log': {
        const own = msg.id === undefined ? undefined : this.pending.get(msg.id)?.log;
        if (own) own(msg.level, msg.msg);
        else this.options.log?.(msg.level, msg.msg, msg.id);
        break;
      }
      case 'started': {
        const p = this.pending.get(msg.id);
        if (!p) break;
        // A request for several images may leave the queue in more than one batch: the largest counts.
        const first = p.batchSize === undefined;
        p.batchSize = Math.max(p.batchSize ?? 0, msg.batchSize);
        if (first) p.onStart?.(msg.id);
        break;
      }
      case 'progress':
        this.pending.get(msg.id)?.onProgress?.(msg.progress);
        break;
      case 'done': {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        // Buffers arrive as plain Uint8Arrays (structured clone): Buffers again, without a copy.
        const buf = (b: Buffer) => {
          const u = b as unknown as Uint8Array;
          return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
        };
        const g = msg.generation;
        p?.resolve({ ...g, png: buf(g.png), ...(g.more ? { more: g.more.map((m) => ({ seed: m.seed, png: buf(m.png) })) } : {}) });
        break;
      }
      case 'failed': {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        p?.reject(new EngineError(msg.error));
        break;
      }
      default:
        break;
    }
  }

  /** Hung: generations are running, and the thread has said nothing for stallMs. */
  private checkStall(stallMs: number): void {
    const silentMs = performance.now() - this.lastBeat;
    if (silentMs <= stallMs || ![...this.pending.values()].some((p) => p.batchSize !== undefined)) return;
    this.down(new EngineDownError('stalled', `engine thread made no progress for ${Math.round(silentMs)} ms (limit ${stallMs} ms)`));
  }

  /** The engine is down: fail what is pending, stop the thread, tell the listeners. */
  private down(err: EngineDownError): void {
    if (this.closed || this.downReason) return;
    this.downReason = err;
    clearInterval(this.watchdog);
    for (const p of this.pending.values()) p.reject(new EngineDownError(err.reason, err.message, err.unkillable, p.batchSize ?? 0));
    this.pending.clear();
    if (err.reason !== 'stalled') {
      for (const l of this.downListeners) l(err);
      return;
    }
    // A hung thread is terminated first, so a new engine does not share the CPU or device with it.
    // Termination interrupts JavaScript, but not a native call that never returns: then only the
    // process's end frees the thread, and the listeners are told so.
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((r) => (timer = setTimeout(() => r(false), TERMINATE_TIMEOUT_MS)));
    void Promise.race([this.worker.terminate().then(() => true), timedOut]).then((stopped) => {
      clearTimeout(timer);
      const final = stopped ? err : new EngineDownError(err.reason, `${err.message}; the thread did not stop when terminated`, true);
      this.downReason = final;
      for (const l of this.downListeners) l(final);
    });
  }

  /** Cancels what is running, releases the model and stops the thread. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.watchdog);
    const err = new Error('engine closed');
    err.name = 'AbortError';
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    if (this.downReason) {
      // A thread stuck in native code may never stop: do not wait for it longer than for a live one.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.worker.terminate().catch(() => undefined), new Promise((r) => (timer = setTimeout(r, TERMINATE_TIMEOUT_MS)))]);
      clearTimeout(timer);
      return;
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => void this.worker.terminate().then(() => resolve()), 5000);
      this.worker.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
      this.worker.postMessage({ type: 'close' } satisfies ToThread);
    });
  }
}
