import { createHash } from 'node:crypto';
import type { EngineInfo } from '../engine/thread/protocol.js';
import type { GenerateParams, Generation, Progress } from '../engine/pipeline.js';

/**
 * Keeps a worker's engine running. When the engine goes down (its thread died, or a generation
 * hung), the worker must stop taking jobs at once: `onDown` tells it to. The engine is then
 * started again, reloading the model, after a backoff that doubles with each consecutive
 * restart; once it is up, `onUp` lets the worker take jobs again. A generation that finishes
 * resets the count. After `maxRestarts` consecutive restarts that did not help (or a hung
 * thread that could not be stopped), `onGiveUp` says the process should exit so its supervisor
 * (Kubernetes, compose, systemd) starts a fresh one.
 *
 * A batch that takes the engine down does not say which of its jobs did it. Each of them is
 * handed back without blame (the processor counts an engine failure only against a job that ran
 * alone: its own images, if it asked for several, are not others), and is remembered here: the
 * next time this worker gets it, it runs alone, so a poison job soon fails by itself and the
 * others go through.
 */

/** What the supervisor needs of an engine (src/engine/thread/engine-host.ts's Engine). */
export interface SupervisedEngine {
  readonly info: EngineInfo;
  readonly alive: boolean;
  /** `alone`: in a batch of its own (its own images only), as a suspect of an earlier fall. */
  generate(params: GenerateParams, run: EngineRun & { alone?: boolean }): Promise<Generation>;
  onDown(listener: (err: DownError) => void): void;
  close(): Promise<void>;
}

export type EngineLog = (level: 'debug' | 'info' | 'warn', msg: string) => void;

/** How a worker runs one generation: progress (with a latent preview every `previewEvery` steps), cancellation, its log lines. */
export interface EngineRun {
  onProgress?: (p: Progress) => void;
  previewEvery?: number;
  signal?: AbortSignal;
  log?: EngineLog;
}

export interface DownError extends Error {
  reason: string;
  unkillable: boolean;
  /** How many jobs' generations ran together when the engine went down (0: this one was waiting). */
  batchSize?: number;
}

export interface EngineSupervisorOptions {
  start(): Promise<SupervisedEngine>;
  /** Consecutive restarts allowed before giving up. */
  maxRestarts: number;
  /** Wait before the first restart; doubled for each further one. */
  backoffMs: number;
  onDown(err: DownError): void;
  onUp(info: EngineInfo, restarts: number): void;
  onGiveUp(err: Error): void;
  log: { warn(obj: object, msg: string): void; error(obj: object, msg: string): void; info(obj: object, msg: string): void };
}

/** A generation asked of an engine that is down or restarting: the job is handed back, not failed. */
export class EngineUnavailableError extends Error {
  override name = 'EngineDownError';
  readonly reason = 'restarting';
  readonly unkillable = false;
  /** It never reached the engine. */
  readonly batchSize = 0;
}

/** Generations remembered as having been in a batch that went down; the oldest are forgotten first. */
const MAX_SUSPECTS = 10_000;

export class EngineSupervisor {
  private engine: SupervisedEngine | undefined;
  private consecutive = 0;
  private closed = false;
  private restarting: Promise<void> | undefined;
  private backoffTimer: NodeJS.Timeout | undefined;
  private wakeBackoff: (() => void) | undefined;
  /** Digests of the parameters of generations that were in a batch when the engine went down. */
  private readonly suspects = new Set<string>();

  private constructor(private readonly opts: EngineSupervisorOptions) {}

  /** Starts the first engine; a failure here is the caller's (the worker cannot start). */
  static async start(opts: EngineSupervisorOptions): Promise<EngineSupervisor> {
    const s = new EngineSupervisor(opts);
    s.adopt(await opts.start());
    return s;
  }

  /** The model's info; the first engine's until a restart loads it again. */
  get info(): EngineInfo {
    return this.current().info;
  }

  get ready(): boolean {
    return !this.closed && this.engine !== undefined && this.engine.alive;
  }

  private current(): SupervisedEngine {
    if (!this.engine) throw new Error('no engine');
    return this.engine;
  }

  private adopt(engine: SupervisedEngine): void {
    this.engine = engine;
    engine.onDown((err) => this.onEngineDown(engine, err));
  }

  async generate(params: GenerateParams, run: EngineRun): Promise<Generation> {
    const engine = this.engine;
    if (!engine || !engine.alive || this.restarting) throw new EngineUnavailableError('the engine is restarting');
    const key = createHash('sha256').update(JSON.stringify(params)).digest('base64');
    const alone = this.suspects.has(key);
    try {
      const generation = await engine.generate(params, { ...run, ...(alone ? { alone } : {}) });
      this.consecutive = 0;
      this.suspects.delete(key);
      return generation;
    } catch (err) {
      const batchSize = (err as Partial<DownError>).batchSize;
      if ((err as Error).name === 'EngineDownError' && batchSize !== undefined && batchSize > 1) {
        this.suspects.add(key);
        if (this.suspects.size > MAX_SUSPECTS) this.suspects.delete(this.suspects.values().next().value!);
      }
      throw err;
    }
  }

  private onEngineDown(engine: SupervisedEngine, err: DownError): void {
    if (this.closed || engine !== this.engine) return;
    this.opts.onDown(err);
    if (err.unkillable) {
      this.opts.log.error({ reason: err.reason }, 'engine thread cannot be stopped; the process must restart');
      this.opts.onGiveUp(err);
      return;
    }
    this.restarting = this.restart(engine, err).finally(() => {
      this.restarting = undefined;
    });
  }

  private async restart(old: SupervisedEngine, err: DownError): Promise<void> {
    await old.close().catch(() => undefined);
    for (;;) {
      if (this.closed) return;
      if (this.consecutive >= this.opts.maxRestarts) {
        this.opts.log.error({ restarts: this.consecutive, reason: err.reason }, 'engine restarts exhausted; giving up');
        this.opts.onGiveUp(new Error(`the engine went down ${this.consecutive + 1} times in a row (last: ${err.message})`));
        return;
      }
      const waitMs = this.opts.backoffMs * 2 ** this.consecutive;
      this.consecutive++;
      this.opts.log.warn({ reason: err.reason, err: { message: err.message }, restart: this.consecutive, waitMs }, 'engine down; restarting it');
      await new Promise<void>((resolve) => {
        this.wakeBackoff = resolve;
        this.backoffTimer = setTimeout(resolve, waitMs);
      });
      if (this.closed) return;
      try {
        const engine = await this.opts.start();
        if (this.closed) {
          await engine.close();
          return;
        }
        this.adopt(engine);
        this.opts.onUp(engine.info, this.consecutive);
        return;
      } catch (startErr) {
        this.opts.log.warn({ err: startErr, restart: this.consecutive }, 'engine restart failed');
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.backoffTimer);
    this.wakeBackoff?.();
    await this.restarting;
    await this.engine?.close();
  }
}
