/**
 * Process plumbing shared by the throwaway services: spawning a server in its own process
 * group with its log file, stopping it (and whatever it left in its group), waiting until a
 * real client request succeeds, and retrying a start when a port was taken in the meantime.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, appendFileSync, closeSync, constants as fsConstants, existsSync, openSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const INSTALL_HINT = 'run `sudo bash scripts/install-system-deps.sh` (Debian 12) to install it';
/** How long a server gets to exit after its stop signal before SIGKILL (ms). */
const STOP_TIMEOUT_MS = 5_000;
/** Interval between readiness probes (ms). */
const READY_POLL_MS = 100;

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** The message of an error of any kind, for reports. */
export const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** Asks the OS for a free TCP port on 127.0.0.1. Racy by nature (the port is free *now*), so
 * the starters retry on "address in use" (withPortRetry). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => {
        if (addr && typeof addr === 'object') resolve(addr.port);
        else reject(new Error('freePort: the OS returned no port for 127.0.0.1:0'));
      });
    });
  });
}

/** Resolves true if `p` settled within `ms`, false otherwise; clears its timer either way so a
 * pending timeout does not hold the process open after stop(). */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true as const), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The last lines of a log file, for error messages. */
export function tail(file: string, lines = 30): string {
  try {
    const all = readFileSync(file, 'utf8').trimEnd().split('\n');
    return all.slice(-lines).join('\n');
  } catch {
    return '(no log written)';
  }
}

function findExecutable(name: string, extraDirs: string[] = []): string | undefined {
  const dirs = [...extraDirs, ...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
  for (const d of dirs) {
    if (!d) continue;
    const p = join(d, name);
    try {
      accessSync(p, fsConstants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}

export function requireExecutable(service: string, name: string, pkg: string, extraDirs: string[] = []): string {
  const p = findExecutable(name, extraDirs);
  if (!p) throw new Error(`${service}: \`${name}\` not found (Debian package ${pkg}); ${INSTALL_HINT}`);
  return p;
}

/**
 * The path of a helper script shipped in src/dev/services/scripts. Found from the package root
 * (the first folder above this module with a package.json), so it is the same file whether this
 * module runs from src/ (tsx, vitest) or compiled from dist/src/ (`npm run build` copies no
 * assets; the scripts stay in the source tree, which every place that starts these services has).
 */
export function scriptPath(name: string): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`services: no package.json above ${fileURLToPath(import.meta.url)}, so ${name} cannot be found`);
    dir = parent;
  }
  const file = join(dir, 'src', 'dev', 'services', 'scripts', name);
  if (!existsSync(file)) throw new Error(`services: helper script ${file} is missing (it belongs to the source tree, src/dev/services/scripts)`);
  return file;
}

export function readScript(name: string): string {
  return readFileSync(scriptPath(name), 'utf8');
}

/** Turns a server's command into one that runs elsewhere, e.g. `ip netns exec NS cmd args...`. */
export type CommandWrapper = (cmd: string, args: string[]) => { cmd: string; args: string[] };

/** Where the servers run and listen. */
export interface Placement {
  /** The address servers listen on and clients use: 127.0.0.1, or a network namespace's address. */
  host: string;
  /** Runs each server through this (not the one-shot helpers, which use no network). */
  wrap?: CommandWrapper;
}

export const isLoopback = (host: string) => host === '127.0.0.1' || host === 'localhost' || host === '::1';

/**
 * The command that starts a server where `placement` says, as `owner` when given. Without a
 * wrapper the uid and gid go to spawn(); with one, the wrapper (`ip netns exec`) must run as root,
 * so setpriv drops to the owner inside it. Both exec their command, so the PID spawn() returns
 * stays the server's, and signals to its process group reach it.
 */
export function serverCommand(
  placement: Placement,
  cmd: string,
  args: string[],
  owner?: { uid: number; gid: number },
): { cmd: string; args: string[]; uid?: number; gid?: number } {
  if (!placement.wrap) return { cmd, args, uid: owner?.uid, gid: owner?.gid };
  const inner = owner ? { cmd: 'setpriv', args: [`--reuid=${owner.uid}`, `--regid=${owner.gid}`, '--clear-groups', '--', cmd, ...args] } : { cmd, args };
  return placement.wrap(inner.cmd, inner.args);
}

/** A spawned server or helper, as the registry tracks it. */
export interface Managed {
  name: string;
  pid: number;
  child: ChildProcess;
  logFile: string;
  /** Postgres' SIGTERM is a "smart" shutdown that waits for clients to leave; SIGINT is fast. */
  stopSignal: NodeJS.Signals;
  exited: Promise<void>;
  hasExited: () => boolean;
}

export interface SpawnSpec {
  name: string;
  cmd: string;
  args: string[];
  logFile: string;
  stopSignal?: NodeJS.Signals;
  uid?: number;
  gid?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** A short helper (initdb, ring builder) that start-up awaits: not handed to the watchdog. */
  oneShot?: boolean;
}

/**
 * Every process started for one startServices() call. Servers are also listed in `pidFile`
 * (one "PID SIGNAL" line each) for the watchdog, which stops them if this Node process dies.
 */
export class Registry {
  readonly procs: Managed[] = [];
  /** Set once start-up is over: later spawns (restarts) are unref'd at once. */
  private unrefNew = false;
  constructor(private readonly pidFile: string) {}

  spawn(spec: SpawnSpec): Managed {
    // The log is opened here and inherited as stdout/stderr, so a service running as another
    // user (postgres) can write it without owning the folder.
    const fd = openSync(spec.logFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn(spec.cmd, spec.args, {
        detached: true, // own process group: stop() signals -pid and reaches its children
        stdio: ['ignore', fd, fd],
        uid: spec.uid,
        gid: spec.gid,
        env: spec.env ?? process.env,
        cwd: spec.cwd,
      });
    } finally {
      closeSync(fd);
    }
    if (child.pid === undefined) {
      throw new Error(`${spec.name}: could not spawn ${spec.cmd}`);
    }
    let done = false;
    const exited = new Promise<void>((resolve) => {
      child.once('exit', (code, signal) => {
        done = true;
        appendFileSync(spec.logFile, `\n[services] ${spec.name} exited (code ${code}, signal ${signal})\n`);
        resolve();
      });
      child.once('error', (err) => {
        done = true;
        appendFileSync(spec.logFile, `\n[services] ${spec.name} failed to spawn: ${err.message}\n`);
        resolve();
      });
    });
    const m: Managed = {
      name: spec.name,
      pid: child.pid,
      child,
      logFile: spec.logFile,
      stopSignal: spec.stopSignal ?? 'SIGTERM',
      exited,
      hasExited: () => done,
    };
    if (this.unrefNew) child.unref();
    this.procs.push(m);
    if (!spec.oneShot) appendFileSync(this.pidFile, `${m.pid} ${m.stopSignal}\n`);
    return m;
  }

  /** Once started, the services must not keep the event loop alive: a test run that forgets
   * stop() must still exit (the watchdog then cleans up). While starting they must, or Node
   * would exit in the middle of `await initdb.exited`. */
  unrefAll(): void {
    this.unrefNew = true;
    for (const p of this.procs) p.child.unref();
  }
}

export function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    try {
      process.kill(pid, signal); // not a group leader after all (should not happen)
    } catch {
      /* already gone */
    }
  }
}

export async function terminate(m: Managed, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
  // A process that exited earlier (initdb, a failed server) is left alone: its PID, and so
  // its group id, may belong to someone else by now.
  if (m.hasExited()) return;
  killGroup(m.pid, m.stopSignal);
  if (!(await settlesWithin(m.exited, timeoutMs))) {
    killGroup(m.pid, 'SIGKILL');
    await settlesWithin(m.exited, 2_000);
  }
  // Sweep whatever the leader left behind in its group (e.g. a postgres backend).
  try {
    process.kill(-m.pid, 'SIGKILL');
  } catch {
    /* empty group: the normal case */
  }
}

/**
 * Polls `check` until it succeeds; fails fast with the log tail if a process of the service
 * exits, or after `timeoutMs`.
 */
export async function waitReady(service: string, procs: Managed[], timeoutMs: number, check: () => Promise<void>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    const dead = procs.find((p) => p.hasExited());
    if (dead) {
      throw new Error(`${service}: ${dead.name} exited while starting. Log ${dead.logFile}:\n${tail(dead.logFile)}`);
    }
    try {
      await check();
      return;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > deadline) {
      const logs = procs.map((p) => `--- ${p.logFile}:\n${tail(p.logFile)}`).join('\n');
      throw new Error(`${service}: not ready after ${timeoutMs / 1000} s (last error: ${messageOf(lastErr)}).\n${logs}`);
    }
    await sleep(READY_POLL_MS);
  }
}

const isPortClash = (err: unknown) => /address already in use|EADDRINUSE|could not bind|Errno 98/i.test(messageOf(err));

/** Runs a starter, retrying with new ports when a port taken since freePort() was the cause. */
export async function withPortRetry<T>(registry: Registry, attempt: () => Promise<T>, tries = 3): Promise<T> {
  for (let i = 1; ; i++) {
    const before = registry.procs.length;
    try {
      return await attempt();
    } catch (err) {
      if (i >= tries || !isPortClash(err)) throw err;
      // Stop what this attempt started before trying again with fresh ports.
      await Promise.all(registry.procs.slice(before).map((p) => terminate(p, 2_000)));
    }
  }
}

/** A one-process service that can be stopped and started again on the same port and data. */
export interface Restartable<I extends { port: number; pid: number }> {
  /** Mutable: `pid` follows restarts, so callers holding it see the current one. */
  info: I;
  stop(): Promise<void>;
  start(): Promise<void>;
}

export async function restartable<I extends { port: number; pid: number }>(
  registry: Registry,
  launch: (port: number) => Promise<Managed>,
  describe: (port: number, pid: number) => I,
): Promise<Restartable<I>> {
  let current: Managed | undefined;
  const info = await withPortRetry(registry, async () => {
    const port = await freePort();
    current = await launch(port);
    return describe(port, current.pid);
  });
  return {
    info,
    stop: async () => {
      if (current) await terminate(current);
    },
    start: async () => {
      if (current && !current.hasExited()) return;
      current = await launch(info.port);
      info.pid = current.pid;
    },
  };
}
