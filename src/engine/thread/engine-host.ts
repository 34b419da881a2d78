import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { ProviderChoice } from '../onnx/runtime.js';
import type { GenerateParams, Generation, Progress } from '../pipeline.js';
import type { EngineInfo, FromThread, SerializedError, ThreadInit, ToThread } from './protocol.js';

/**
 * The engine as the rest of the service sees it: a model loaded once in its own thread,
 * generations run one at a time, progress and cancellation across the thread boundary.
 */

export interface EngineOptions {
  modelDir: string;
  provider?: ProviderChoice;
  threads?: number;
  /** Lines the engine thread writes (provider choice, prompt truncation), with the generation they belong to. */
  log?: (level: 'debug' | 'info' | 'warn', msg: string, generationId?: number) => void;
}

export interface RunOptions {
  onProgress?: (progress: Progress) => void;
  signal?: AbortSignal;
  previewEvery?: number;
  returnLatents?: boolean;
  /** Called with the engine's id for this generation, so log lines can be matched to it. */
  onStart?: (generationId: number) => void;
  /** Receives the engine thread's lines about this generation (instead of EngineOptions.log), so they carry the job's context. */
  log?: EngineLog;
}

export type EngineLog = (level: 'debug' | 'info' | 'warn', msg: string) => void;

interface Pending {
  resolve: (g: Generation) => void;
  reject: (e: Error) => void;
  onProgress?: (p: Progress) => void;
  log?: EngineLog;
}

export class EngineError extends Error {
  constructor(e: SerializedError) {
    super(e.message);
    this.name = e.name;
    if (e.stack) this.stack = e.stack;
  }
}

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

export class Engine {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  private deathReason: Error | undefined;

  private constructor(
    private readonly worker: Worker,
    readonly info: EngineInfo,
    private readonly options: EngineOptions,
  ) {
    worker.on('message', (msg: FromThread) => this.onMessage(msg));
    worker.on('error', (err) => this.die(err));
    worker.on('exit', (code) => this.die(new Error(`engine thread exited with code ${code}`)));
  }

  /** Starts the thread and resolves once the model is loaded (or rejects with why it could not be). */
  static start(options: EngineOptions): Promise<Engine> {
    const init: ThreadInit = { modelDir: options.modelDir, provider: options.provider ?? 'auto', ...(options.threads ? { threads: options.threads } : {}) };
    const worker = spawnThread(init);
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
    return !this.closed && !this.deathReason;
  }

  /** Queues a generation; generations run one at a time in arrival order. */
  generate(params: GenerateParams, run: RunOptions = {}): Promise<Generation> {
    const result = this.queue.then(() => this.runOne(params, run));
    this.queue = result.catch(() => undefined);
    return result;
  }

  private runOne(params: GenerateParams, run: RunOptions): Promise<Generation> {
    if (this.deathReason) return Promise.reject(this.deathReason);
    if (this.closed) return Promise.reject(new Error('engine is closed'));
    const id = this.nextId++;
    run.onStart?.(id);
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
      });
      this.send({ type: 'generate', id, params, previewEvery: run.previewEvery ?? 0, returnLatents: run.returnLatents ?? false });
    });
  }

  private send(msg: ToThread): void {
    if (this.alive || msg.type === 'close') this.worker.postMessage(msg);
  }

  private onMessage(msg: FromThread): void {
    switch (msg.type) {
      case 'log': {
        const own = msg.id === undefined ? undefined : this.pending.get(msg.id)?.log;
        if (own) own(msg.level, msg.msg);
        else this.options.log?.(msg.level, msg.msg, msg.id);
        break;
      }
      case 'progress':
        this.pending.get(msg.id)?.onProgress?.(msg.progress);
        break;
      case 'done': {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        const png = msg.generation.png as unknown as Uint8Array;
        p?.resolve({ ...msg.generation, png: Buffer.from(png.buffer, png.byteOffset, png.byteLength) });
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

  private die(err: Error): void {
    if (this.closed) return;
    this.deathReason ??= err;
    for (const p of this.pending.values()) p.reject(this.deathReason);
    this.pending.clear();
  }

  /** Cancels what is running, releases the model and stops the thread. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = new Error('engine closed');
    err.name = 'AbortError';
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    if (this.deathReason) return;
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
