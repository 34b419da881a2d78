import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig } from '../config.js';
import { applyMigrations } from '../adapters/db/migrate.js';
import { DEFAULT_MODELS_DIR, loadTestModels, UsageError } from './engine-commands.js';

/** The service's commands: api, worker, migrate, and demo (the whole system on local defaults). */

function configOrExit(role: 'api' | 'worker' | 'any') {
  try {
    return loadConfig(process.env, role);
  } catch (err) {
    if (err instanceof ConfigError) throw new UsageError(`${err.message}\nSet these in the environment (see .env.example).`);
    throw err;
  }
}

/**
 * Exit codes of `t2i api` and `t2i worker` (README "Exit codes"):
 *   0    drained: stopped by SIGINT/SIGTERM, every job finished or handed back, every cleanup step done
 *   1    error: start-up failed, the worker's engine could not be kept running, or a cleanup step
 *        failed or timed out
 *   130  forced: a second SIGINT/SIGTERM while shutting down
 */
const EXIT = { drained: 0, error: 1, forced: 130 } as const;

/**
 * Runs until SIGINT/SIGTERM (or `fatal` settles), then closes; a second signal exits at once.
 * Resolves with the exit code.
 */
function untilSignal(close: () => Promise<boolean | void>, fatal?: Promise<Error>, onFatal?: (err: Error) => void): Promise<number> {
  return new Promise((resolve) => {
    let closing = false;
    const shutdown = (failed: boolean) => {
      closing = true;
      close().then(
        (clean) => resolve(failed || clean === false ? EXIT.error : EXIT.drained),
        () => resolve(EXIT.error),
      );
    };
    const onSignal = (signal: NodeJS.Signals) => {
      if (closing) {
        process.stderr.write(`${signal} again: exiting now\n`);
        process.exit(EXIT.forced);
      }
      shutdown(false);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    void fatal?.then((err) => {
      if (closing) return;
      onFatal?.(err);
      shutdown(true);
    });
  });
}

/**
 * Sets the exit code, and exits even if a cleanup step that timed out left a socket or timer
 * behind (its promise was abandoned, not its handle).
 */
function exitWith(code: number): number {
  setTimeout(() => process.exit(code), 2_000).unref();
  return code;
}

export async function apiCommand(): Promise<number> {
  const { startApi } = await import('../api/main.js');
  const api = await startApi(configOrExit('api'));
  const { exitOnUncaught } = await import('../core/reporting.js');
  exitOnUncaught(api.reporter, api.logger);
  return exitWith(await untilSignal(() => api.close()));
}

/**
 * `t2i worker [--test-engine [--test-step-ms N]]`. The test engine (src/engine/testing/) is for
 * tests, the demo and benchmarks: a flag, never a configuration variable, so a production
 * deployment cannot select it by accident.
 */
export async function workerCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { 'test-engine': { type: 'boolean' }, 'test-step-ms': { type: 'string' } } });
  const stepMs = Number(values['test-step-ms'] ?? 0);
  if (!Number.isInteger(stepMs) || stepMs < 0) throw new UsageError(`--test-step-ms must be a whole number of milliseconds, got "${values['test-step-ms']}"`);
  if (values['test-step-ms'] !== undefined && !values['test-engine']) throw new UsageError('--test-step-ms needs --test-engine');
  const testEngine = values['test-engine'] ? { stepMs } : undefined;
  const { startWorker } = await import('../worker/main.js');
  // The test engine needs no MODEL_DIR.
  const worker = await startWorker(configOrExit(testEngine ? 'any' : 'worker'), testEngine ? { testEngine } : {});
  const { exitOnUncaught } = await import('../core/reporting.js');
  exitOnUncaught(worker.reporter, worker.logger);
  const code = await untilSignal(
    () => worker.close(),
    worker.fatal,
    (err) => worker.logger.fatal({ err }, 'the worker cannot go on; exiting for its supervisor to start a new one'),
  );
  return exitWith(code);
}

/**
 * `t2i migrate [--dir FOLDER]` (also `npm run db:migrate`): applies the pending migrations of
 * prisma/migrations (or FOLDER) to DATABASE_URL. Safe on every deploy or container start: it
 * does nothing when the database is up to date, and concurrent runs wait for each other.
 */
export async function migrateCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { dir: { type: 'string' } } });
  const config = configOrExit('any');
  const log = (m: string) => process.stderr.write(`${m}\n`);
  const { applied } = await applyMigrations(config.DATABASE_URL, values.dir ? { migrationsDir: path.resolve(values.dir), log } : { log });
  process.stdout.write(applied.length ? `applied ${applied.join(', ')}\n` : 'database is up to date\n');
}

const BIN = fileURLToPath(new URL('../../bin/t2i.js', import.meta.url));

function child(name: string, args: string[], env: NodeJS.ProcessEnv): ChildProcess {
  const proc = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const prefix = (chunk: Buffer) =>
    chunk
      .toString()
      .split('\n')
      .filter(Boolean)
      .map((l) => `[${name}] ${l}\n`)
      .join('');
  proc.stdout?.on('data', (c: Buffer) => process.stderr.write(prefix(c)));
  proc.stderr?.on('data', (c: Buffer) => process.stderr.write(prefix(c)));
  return proc;
}

async function waitFor(url: string, timeoutMs: number, procs: ChildProcess[]): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (procs.some((p) => p.exitCode !== null)) throw new Error(`a process exited while starting (see its log above)`);
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`${url} did not answer within ${timeoutMs / 1000} s`);
}

/** A key for the demo's tenant, through the same service `t2i keys create` uses. */
async function createDemoKey(databaseUrl: string): Promise<string> {
  const [{ createPrismaClient }, { createAccountsRepo }, { AccountsService }] = await Promise.all([
    import('../adapters/db/client.js'),
    import('../adapters/accounts-repo.js'),
    import('../core/accounts.js'),
  ]);
  const db = createPrismaClient(databaseUrl, { poolMax: 1 });
  try {
    return (await new AccountsService(createAccountsRepo(db)).createKey('demo', 'demo')).key;
  } finally {
    await db.$disconnect();
  }
}

/**
 * The whole system on embedded defaults: throwaway Postgres, Redis and S3 (OpenStack Swift) in a
 * temp folder, the oracle model, the API on :8000 and one worker; then it submits a prompt,
 * shows its progress, prints the image URL and the web page's address with the key to paste, and
 * keeps running for the browser and curl until Ctrl-C.
 */
export async function demoCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      prompt: { type: 'string', default: 'a red circle on the left' },
      port: { type: 'string', default: '8000' },
      'metrics-port': { type: 'string', default: '9191' },
      exit: { type: 'boolean', default: false },
    },
  });
  const say = (m: string) => process.stdout.write(`${m}\n`);
  const { servicesEnv, startServices } = await import('../dev/services.js');
  say('starting Postgres, Redis and S3 (OpenStack Swift) on 127.0.0.1 in a temp folder ...');
  const services = await startServices({ log: (m) => process.stderr.write(`[services] ${m}\n`) });
  const procs: ChildProcess[] = [];
  const stopAll = async () => {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGTERM');
    await Promise.all(procs.map((p) => (p.exitCode === null ? new Promise((r) => p.once('exit', r)) : Promise.resolve())));
    await services.stop();
  };
  try {
    const modelDir = path.join(DEFAULT_MODELS_DIR, 'oracle');
    if (!existsSync(path.join(modelDir, 'model_index.json'))) await (await loadTestModels()).writeOracleModel(modelDir);
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      ...servicesEnv(services, 't2i-images'),
      MODEL_DIR: modelDir,
      HOST: '127.0.0.1',
      PORT: values.port,
      WORKER_METRICS_PORT: values['metrics-port'],
      LOG_PRETTY: 'false',
      LOG_LEVEL: process.env.LOG_LEVEL ?? 'warn',
    };
    await applyMigrations(services.postgres.url, { log: (m) => process.stderr.write(`[migrate] ${m}\n`) });
    // The API needs a key, as in production: make one the way `t2i keys create` does.
    const key = await createDemoKey(services.postgres.url);
    const auth = { authorization: `Bearer ${key}` };
    procs.push(child('api', ['api'], env), child('worker', ['worker'], env));
    const api = `http://127.0.0.1:${values.port}`;
    await waitFor(`${api}/healthz`, 60_000, procs);
    await waitFor(`http://127.0.0.1:${values['metrics-port']}/healthz`, 60_000, procs);
    say(`API on ${api}, worker metrics on http://127.0.0.1:${values['metrics-port']}, model ${modelDir}`);
    say(`\nAPI key of the tenant "demo" (made like \`t2i keys create --tenant demo\`, shown only once):\n  ${key}`);
    say(`\n$ export T2I_KEY=${key}`);

    const body = { prompt: values.prompt, num_steps: 30 };
    say(`$ curl -X POST ${api}/generated-images -H "Authorization: Bearer $T2I_KEY" -H 'content-type: application/json' -d '${JSON.stringify(body)}'`);
    const created = await fetch(`${api}/generated-images`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const job = (await created.json()) as { id: string; status: string; progress: number };
    say(`${created.status} ${JSON.stringify(job)}`);
    let last = -1;
    for (;;) {
      const r = (await (await fetch(`${api}/generated-images/${job.id}`, { headers: auth })).json()) as {
        status: string;
        progress: number;
        file_name: string | null;
        error: string | null;
      };
      if (r.progress !== last || r.status !== 'running') {
        if (r.progress !== last) say(`GET /generated-images/${job.id} -> status ${r.status}, progress ${r.progress}`);
        last = r.progress;
      }
      if (r.status === 'succeeded') {
        say(`file_name ${r.file_name}`);
        break;
      }
      if (r.status === 'failed' || r.status === 'canceled') throw new Error(`the demo job ended ${r.status}: ${r.error}`);
      await new Promise((res) => setTimeout(res, 100));
    }
    const url = (await (await fetch(`${api}/generated-images/${job.id}/url`, { headers: auth })).json()) as { url: string; expires_at: string };
    say(`\nimage URL (valid until ${url.expires_at}):\n${url.url}\n`);
    const h = '-H "Authorization: Bearer $T2I_KEY"';
    say(`try it yourself (after the export above):`);
    say(`  curl -s -X POST ${api}/generated-images ${h} -H 'content-type: application/json' -d '{"prompt": "a blue square at the top", "num_steps": 20}'`);
    say(`  curl -s ${api}/generated-images/<id> ${h}\n  curl -s ${api}/generated-images/<id>/url ${h}`);
    say(`  curl -s ${api}/usage ${h}\n  curl -s -X DELETE ${api}/generated-images/<id> ${h}`);
    say(`  curl -s ${api}/generated-images ${h.replace('$T2I_KEY', 'not-a-key')}      # 401 problem+json`);
    // The page is the API's own (dist/web, made by `npm run build:web`, which scripts/demo.sh runs
    // first; or WEB_DIR, which the API child inherits and reads the same way).
    const { findWebDir } = await import('../api/web.js');
    if (process.env.WEB_DIR ?? findWebDir()) {
      say(`\nThe web page: open ${api}/ in a browser and sign in with the key above (it stays in the browser):\n  ${key}`);
    } else {
      say(`\nThe web page is not built, so ${api}/ only says so: run \`npm run build:web\` (scripts/demo.sh does) and start the demo again.`);
    }
    if (values.exit) return;
    say('\nrunning until Ctrl-C ...');
    await untilSignal(async () => undefined);
  } finally {
    await stopAll();
    say('stopped');
  }
}
