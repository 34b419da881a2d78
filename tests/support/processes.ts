import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket, connect } from 'node:net';
import path from 'node:path';
import { loadConfig, type Config } from '../../src/config.js';
import { applyMigrations } from '../../src/adapters/db/migrate.js';
import { freePort, servicesEnv, startServices, type LocalServices } from '../../src/dev/services.js';

/**
 * Real API and worker processes for failure tests: started with `node bin/t2i.js api|worker`
 * and a Config turned back into environment variables, their JSON log lines collected, killed
 * with whatever signal a test needs.
 */

export const BIN = path.resolve('bin/t2i.js');

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export class ServiceProcess {
  readonly lines: LogLine[] = [];
  readonly stderr: string[] = [];
  private partial = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Set on 'close': the process is gone and its output is read to the end. */
  private outputClosed = false;
  /** Called with each new log line, and with undefined once the output has closed. */
  private readonly lineWaiters = new Set<(line: LogLine | undefined) => void>();

  constructor(
    readonly name: string,
    readonly proc: ChildProcess,
  ) {
    proc.stdout!.on('data', (chunk: Buffer) => this.onData(chunk.toString()));
    proc.stderr!.on('data', (chunk: Buffer) => this.stderr.push(chunk.toString()));
    this.exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
    proc.once('close', () => {
      this.outputClosed = true;
      for (const w of [...this.lineWaiters]) w(undefined);
    });
  }

  private onData(text: string): void {
    const parts = (this.partial + text).split('\n');
    this.partial = parts.pop() ?? '';
    for (const line of parts) {
      if (!line.trim()) continue;
      let parsed: LogLine;
      try {
        parsed = JSON.parse(line) as LogLine;
      } catch {
        this.stderr.push(line);
        continue;
      }
      this.lines.push(parsed);
      for (const w of [...this.lineWaiters]) w(parsed);
    }
  }

  get pid(): number {
    return this.proc.pid!;
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  kill(signal: NodeJS.Signals): void {
    if (this.running) this.proc.kill(signal);
  }

  /** Resident set size in bytes, from /proc. */
  /**
   * Resolves with the first log line matching `pred`, as soon as it is read; fails with the
   * process's output if it exits first (checked once all its output is read) or on timeout.
   */
  waitForLine(pred: (l: LogLine) => boolean, timeoutMs = 30_000): Promise<LogLine> {
    const hit = this.lines.find(pred);
    if (hit) return Promise.resolve(hit);
    if (this.outputClosed) return Promise.reject(new Error(`${this.name} exited before the expected log line:\n${this.output()}`));
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.lineWaiters.delete(waiter);
      };
      const waiter = (line: LogLine | undefined) => {
        if (line === undefined) {
          done();
          reject(new Error(`${this.name} exited before the expected log line:\n${this.output()}`));
        } else if (pred(line)) {
          done();
          resolve(line);
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`${this.name}: expected log line not seen in ${timeoutMs} ms:\n${this.output()}`));
      }, timeoutMs);
      this.lineWaiters.add(waiter);
    });
  }

  output(): string {
    return [...this.lines.slice(-30).map((l) => JSON.stringify(l)), ...this.stderr.slice(-30)].join('\n');
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.kill('SIGTERM');
    const timer = setTimeout(() => this.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(timer);
  }
}

/** The environment a process needs to load `config` again. */
export function configEnv(config: Config, overrides: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: process.env.HOME };
  for (const [k, v] of Object.entries(config)) if (v !== undefined) env[k] = String(v);
  return { ...env, LOG_PRETTY: 'false', ...overrides };
}

/** `t2i api` or `t2i worker` as a child process; `args` are the command's flags (e.g. --test-engine). */
export function spawnService(name: string, role: 'api' | 'worker', env: NodeJS.ProcessEnv, args: string[] = []): ServiceProcess {
  return new ServiceProcess(name, spawn(process.execPath, [BIN, role, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
}

/** The flags that run a worker on the engine's test double, each step taking `stepMs`. */
export function testEngineArgs(stepMs: number): string[] {
  return ['--test-engine', '--test-step-ms', String(stepMs)];
}

/**
 * A TCP proxy in front of a service, which a test can cut (refusing and dropping connections)
 * and restore, to make storage (or anything) unavailable without stopping the real server; or
 * hold (keeping what clients send, on new and open connections alike, and forwarding nothing)
 * and release, to keep a request in flight for as long as a test needs.
 */
export class CuttableProxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly links = new Set<{ held: Buffer[]; flush: () => void }>();
  private cut = false;
  private holding = false;
  port = 0;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<void> {
    this.server = createServer((client) => {
      if (this.cut) {
        client.destroy();
        return;
      }
      const upstream = connect(this.targetPort, '127.0.0.1');
      this.sockets.add(client).add(upstream);
      const link = {
        held: [] as Buffer[],
        flush: () => {
          for (const c of link.held.splice(0)) upstream.write(c);
        },
      };
      this.links.add(link);
      const drop = () => {
        client.destroy();
        upstream.destroy();
        this.sockets.delete(client);
        this.sockets.delete(upstream);
        this.links.delete(link);
      };
      client.on('error', drop).on('close', drop);
      upstream.on('error', drop).on('close', drop);
      client.on('data', (c: Buffer) => (this.holding ? link.held.push(c) : upstream.write(c)));
      upstream.pipe(client);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const addr = this.server.address();
    this.port = typeof addr === 'object' && addr ? addr.port : 0;
  }

  /** What clients send from now on is kept, not forwarded, until release(). */
  hold(): void {
    this.holding = true;
  }

  /** Bytes kept since hold(). */
  heldBytes(): number {
    let n = 0;
    for (const l of this.links) n += l.held.reduce((a, c) => a + c.length, 0);
    return n;
  }

  /** Forwards what was kept and stops holding. */
  release(): void {
    this.holding = false;
    for (const l of this.links) l.flush();
  }

  /** Refuses new connections and drops open ones until restore(). */
  sever(): void {
    this.cut = true;
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  restore(): void {
    this.cut = false;
  }

  async close(): Promise<void> {
    this.sever();
    await new Promise((r) => this.server?.close(r));
  }
}

/**
 * Services of a test file's own (so it may restart Redis and Postgres), migrated, and the
 * Config of processes that use them (workers run the test engine: spawn them with testEngineArgs).
 */
export async function startOwnSystem(bucket: string, env: Record<string, string>): Promise<{ services: LocalServices; config: Config }> {
  const services = await startServices();
  await applyMigrations(services.postgres.url);
  const config = loadConfig({ ...servicesEnv(services, bucket), HOST: '127.0.0.1', WORKER_METRICS_PORT: '0', ...env }, 'any');
  return { services, config };
}

/** Adds figures to reliability-report.json (REPORT_DIR, default .t2i/), for the README. */
export function saveReport(part: Record<string, unknown>): void {
  const file = path.join(process.env.REPORT_DIR ?? path.resolve('.t2i'), 'reliability-report.json');
  mkdirSync(path.dirname(file), { recursive: true });
  let existing: Record<string, unknown> = {};
  try {
    existing = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch {
    // first writer
  }
  writeFileSync(file, JSON.stringify({ ...existing, ...part }, null, 2));
  console.log(`reliability figures:\n${JSON.stringify(part, null, 2)}`);
}

/** `t2i api` for `config` on a free port, logging at info; resolves once it listens. */
export async function startApiProcess(config: Config, overrides: Record<string, string> = {}, name = 'api'): Promise<{ proc: ServiceProcess; url: string }> {
  const port = await freePort();
  const proc = spawnService(name, 'api', configEnv(config, { PORT: String(port), LOG_LEVEL: 'info', ...overrides }));
  await proc.waitForLine((l) => l.msg === 'api listening');
  return { proc, url: `http://127.0.0.1:${port}` };
}

/** `t2i worker --test-engine` for `config`, logging at info; resolves once it takes jobs. */
export async function startWorkerProcess(config: Config, id: string, stepMs: number, overrides: Record<string, string> = {}): Promise<ServiceProcess> {
  const proc = spawnService(id, 'worker', configEnv(config, { WORKER_ID: id, LOG_LEVEL: 'info', ...overrides }), testEngineArgs(stepMs));
  await proc.waitForLine((l) => l.msg === 'worker ready');
  return proc;
}
