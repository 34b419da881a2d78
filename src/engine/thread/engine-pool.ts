import { availableParallelism } from 'node:os';
import type { GenerateParams, Generation } from '../params.js';
import { Engine, EngineDownError, type EngineOptions, type RunOptions } from './engine-host.js';
import type { EngineInfo } from './protocol.js';

/**
 * Several sessions of one model, each an engine thread of its own, behind the one engine the
 * worker's supervisor sees. On a CPU, onnxruntime spends part of its time on a second intra-op
 * thread waiting at the end of each parallel operator; two sessions of one thread each keep both
 * cores on useful work (`npm run bench`, section 5). Each session holds its own copy of the
 * model.
 *
 * A generation goes to the session with the fewest outstanding ones, where it may batch with
 * others. If one session goes down, the pool is down: the supervisor restarts it whole. The
 * generations of the sessions that were still up are handed back unblamed (batch size 0).
 */
export class EnginePool {
  private readonly outstanding = new Map<Engine, Set<(err: Error) => void>>();
  private downReason: EngineDownError | undefined;
  private readonly listeners: Array<(err: EngineDownError) => void> = [];

  private constructor(private readonly sessions: Engine[]) {
    for (const s of sessions) {
      this.outstanding.set(s, new Set());
      s.onDown((err) => this.down(s, err));
    }
  }

  /**
   * Starts `count` sessions. Unless `threads` is given, each gets an equal share of the cores,
   * so that the sessions do not fight over them.
   */
  static async start(options: EngineOptions, count: number): Promise<EnginePool> {
    const threads = 'test' in options ? undefined : (options.threads ?? Math.max(1, Math.floor(availableParallelism() / count)));
    const perSession: EngineOptions = threads === undefined ? options : { ...options, threads };
    const started = await Promise.allSettled(Array.from({ length: count }, () => Engine.start(perSession)));
    const engines = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await Promise.all(engines.map((e) => e.close()));
      throw failed.reason;
    }
    return new EnginePool(engines);
  }

  /** The first session's, with the batch a whole pool takes: each session batches on its own. */
  get info(): EngineInfo {
    return this.sessions[0]!.info;
  }

  get alive(): boolean {
    return !this.downReason && this.sessions.every((s) => s.alive);
  }

  onDown(listener: (err: EngineDownError) => void): void {
    if (this.downReason) listener(this.downReason);
    else this.listeners.push(listener);
  }

  generate(params: GenerateParams, run: RunOptions = {}): Promise<Generation> {
    if (this.downReason) return Promise.reject(this.downReason);
    const session = [...this.outstanding.entries()].reduce((a, b) => (b[1].size < a[1].size ? b : a))[0];
    const mine = this.outstanding.get(session)!;
    return new Promise<Generation>((resolve, reject) => {
      mine.add(reject);
      session.generate(params, run).then(
        (g) => {
          mine.delete(reject);
          resolve(g);
        },
        (err: Error) => {
          mine.delete(reject);
          reject(err);
        },
      );
    });
  }

  private down(session: Engine, err: EngineDownError): void {
    if (this.downReason) return;
    this.downReason = err;
    // The fallen session has already failed its own generations, saying how many ran together;
    // the others' did nothing wrong.
    for (const [s, rejects] of this.outstanding) {
      if (s === session) continue;
      for (const reject of rejects) reject(new EngineDownError(err.reason, `another session of this engine went down: ${err.message}`, false, 0));
      rejects.clear();
    }
    for (const l of this.listeners) l(err);
  }

  async close(): Promise<void> {
    await Promise.all(this.sessions.map((s) => s.close()));
  }
}
