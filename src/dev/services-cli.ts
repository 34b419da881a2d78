/**
 * Starts throwaway PostgreSQL, Redis and S3 (Swift) on free loopback ports for the demo, CI or
 * a local shell, and prints how to reach them as env lines.
 *
 *   tsx src/dev/services-cli.ts                      # prints env lines, runs until Ctrl-C / SIGTERM
 *   tsx src/dev/services-cli.ts --write-env .env.local # also writes them to a file (once all are ready)
 *   tsx src/dev/services-cli.ts -- npx vitest run     # runs the command with the env, then stops
 *   tsx src/dev/services-cli.ts --only postgres,redis
 *
 * Env lines go to stdout (so `eval "$(...)"`-style use and redirection work); progress goes to
 * stderr. Needs `sudo bash scripts/install-system-deps.sh` once per machine.
 */
import { spawn } from 'node:child_process';
import { renameSync, writeFileSync } from 'node:fs';
import { constants } from 'node:os';
import { startServices, type LocalServices, type ServiceName } from './services.js';

const USAGE = `usage: tsx src/dev/services-cli.ts [--only postgres,redis,s3] [--dir DIR] [--write-env FILE] [-- command args...]`;
const NAMES: readonly ServiceName[] = ['postgres', 'redis', 's3'];

interface Args {
  only?: ServiceName[];
  dir?: string;
  envFile?: string;
  command: string[];
}

function parseArgs(argv: string[]): Args {
  const args: Args = { command: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value\n${USAGE}`);
      return v;
    };
    if (a === '--') {
      args.command = argv.slice(i + 1);
      break;
    } else if (a === '--only') {
      const list = value()
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean);
      const bad = list.filter((s) => !NAMES.includes(s as ServiceName));
      if (bad.length) throw new Error(`--only: unknown service ${bad.join(', ')} (choose from ${NAMES.join(', ')})`);
      args.only = list as ServiceName[];
    } else if (a === '--dir') {
      args.dir = value();
    } else if (a === '--write-env') {
      args.envFile = value();
    } else if (a === '-h' || a === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else {
      throw new Error(`unknown argument ${a}\n${USAGE}`);
    }
  }
  return args;
}

/** The variable names the app's config reads. */
export function envFor(svc: LocalServices, only: readonly ServiceName[] = NAMES): Record<string, string> {
  const env: Record<string, string> = {};
  if (only.includes('postgres')) env.DATABASE_URL = svc.postgres.url;
  if (only.includes('redis')) env.REDIS_URL = svc.redis.url;
  if (only.includes('s3')) {
    env.STORAGE_ENDPOINT = svc.s3.endpoint;
    env.STORAGE_ACCESS_KEY = svc.s3.accessKey;
    env.STORAGE_SECRET_KEY = svc.s3.secretKey;
    env.STORAGE_REGION = svc.s3.region;
  }
  return env;
}

async function main(): Promise<number> {
  const args = parseArgs(process.argv.slice(2));
  const log = (msg: string) => process.stderr.write(`[services] ${msg}\n`);
  const t0 = performance.now();
  const svc = await startServices({ dir: args.dir, only: args.only, log });
  log(`all ready in ${((performance.now() - t0) / 1000).toFixed(2)} s; data and logs in ${svc.dir}`);

  let stopping = false;
  const shutdown = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log(`${why}: stopping`);
    await svc.stop();
  };

  const env = envFor(svc, args.only);
  const lines =
    Object.entries(env)
      .map(([k, v]) => `${k}=${v}`)
      .join('\n') + '\n';
  process.stdout.write(lines);
  if (args.envFile) {
    // Written whole and renamed, so a script polling for the file never reads half of it.
    writeFileSync(`${args.envFile}.tmp`, lines);
    renameSync(`${args.envFile}.tmp`, args.envFile);
  }

  if (args.command.length > 0) {
    const [cmd, ...rest] = args.command as [string, ...string[]];
    const child = spawn(cmd, rest, { stdio: 'inherit', env: { ...process.env, ...env } });
    // Forward Ctrl-C/TERM to the command; services stop once it exits.
    for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => child.kill(sig));
    const code = await new Promise<number>((resolve) => {
      child.once('error', (err) => {
        log(`could not run ${cmd}: ${err.message}`);
        resolve(127);
      });
      child.once('exit', (c, s) => resolve(c ?? 128 + (s ? (constants.signals[s] ?? 0) : 0)));
    });
    await shutdown(`${cmd} exited with ${code}`);
    return code;
  }

  // The services do not hold the event loop open (see services.ts); this timer does.
  const keepAlive = setInterval(() => {}, 1 << 30);
  await new Promise<void>((resolve) => {
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      process.on(sig, () => void shutdown(sig).then(resolve));
    }
  });
  clearInterval(keepAlive);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`[services] ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
