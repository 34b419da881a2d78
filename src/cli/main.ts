import { parseArgs } from 'node:util';
import { generateCommand, makeTestModelsCommand, tokenizeCommand, UsageError } from './engine-commands.js';
import { apiCommand, demoCommand, migrateCommand, workerCommand } from './service-commands.js';

const HELP = `t2i: text-to-image on Stable Diffusion ONNX models

  t2i generate "prompt" [--negative TEXT] [--steps N] [--guidance G] [--seed S]
                        [--scheduler pndm|ddim|euler|euler_ancestral|dpmpp_2m|lcm]
                        [--width W] [--height H] [--image IN.png [--mask MASK.png] [--strength S]]
                        [--model DIR] [--provider auto|cuda|coreml|cpu] [--threads N] [-o out.png]
  t2i tokenize "prompt" [--model DIR]
  t2i make-test-models DIR [--kind all|oracle|random] [--fp16] [--timestep int64|float32|float16]
                        [--variant sd|sd2-v|inpaint|lcm|sdxl|sdxl-turbo|all]
                        [--timestep-rank 0|1] [--ids int32|int64] [--hidden N] [--channels N]
                        [--blocks N] [--external-data]
  t2i bench [--rounds N] [--threads N] [--no-memory] [--batching-only]
                        the engine's overhead and memory; images per second by batch size
  t2i bench service [--rounds N] [--duration S] [--warmup S] [--connections C] [--jobs N]
                        [--log-level L]   API throughput beside bare Fastify, and queue-path
                        overhead per job, on local throwaway services
  t2i bench stream [--jobs N] [--steps N] [--step-ms MS] [--subscribers N]
                        live events: worker step -> SSE client latency (p50, p99) through a
                        second API instance, on local throwaway services

  t2i demo [--prompt TEXT] [--port 8000] [--metrics-port 9191] [--exit]
                        the whole system on local throwaway services, until Ctrl-C
  t2i api               the HTTP API (configured by the environment, see .env.example)
  t2i worker [--test-engine [--test-step-ms N]]
                        a worker: loads MODEL_DIR once, then runs jobs, BATCH_MAX per UNet run
                        (--test-engine: the test double instead of a model, for tests only)
  t2i migrate [--dir FOLDER]
                        applies prisma/migrations (or FOLDER) to DATABASE_URL
  t2i keys create --tenant NAME [--name LABEL] [--json]
                        a new API key for the tenant (created if new), shown only this once
  t2i keys list [--tenant NAME] [--json]    keys by prefix, tenant, name, last use, revocation
  t2i keys revoke PREFIX                    the key stops working at once
  t2i tenants list | set NAME [--max-in-flight N|default] [--daily-pixel-steps N|default]
                        a tenant's own quotas instead of TENANT_MAX_IN_FLIGHT, TENANT_DAILY_PIXEL_STEPS
  t2i doctor [--json]   checks this host or image: Node and onnxruntime, execution providers
                        and their libraries, the model, Postgres, Redis and S3; exits 1 on a problem
  t2i check-libs [DIR|FILE ...] [--require NAME] [--driver-at-runtime]
                        the shared libraries native files need and where they are found
                        (default: onnxruntime-node's binding folder); exits 1 if one is missing
  t2i models push DIR s3://bucket/prefix/    uploads a model export with a checksum manifest
  t2i models pull s3://bucket/prefix/ [--cache DIR]   syncs it into the model cache, verified

The model is --model, else $MODEL_DIR, else the oracle test model (written to .t2i/models on first use).
Steps, guidance, size and scheduler default to what the model is made for (SDXL 1024x1024 at
guidance 5, turbo 1 step without guidance, LCM 4 steps); --image makes it image-to-image
(strength 0.8, SDXL 0.3), --image with --mask inpainting (white is repainted).
`;

async function bench(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      rounds: { type: 'string' },
      threads: { type: 'string' },
      'no-memory': { type: 'boolean' },
      'batching-only': { type: 'boolean' },
      'memory-probe': { type: 'string' },
      duration: { type: 'string' },
      warmup: { type: 'string' },
      connections: { type: 'string' },
      jobs: { type: 'string' },
      'log-level': { type: 'string' },
      'bare-server': { type: 'string' },
      steps: { type: 'string' },
      'step-ms': { type: 'string' },
      subscribers: { type: 'string' },
    },
  });
  const which = positionals[0] ?? 'engine';
  if (positionals.length > 1 || (which !== 'engine' && which !== 'service' && which !== 'stream')) {
    throw new UsageError(`unknown benchmark "${positionals.join(' ')}": use \`t2i bench\` (engine), \`t2i bench service\` or \`t2i bench stream\``);
  }
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new UsageError(`--${name} must be a positive number, got "${v}"`);
    return n;
  };
  if (values['bare-server']) {
    const { runBareServer } = await import('../bench/service-bench.js');
    return runBareServer(num('bare-server', values['bare-server'])!);
  }
  if (which === 'stream') {
    const { runStreamBench } = await import('../bench/stream-bench.js');
    const opts = {
      jobs: num('jobs', values.jobs),
      steps: num('steps', values.steps),
      stepMs: num('step-ms', values['step-ms']),
      subscribers: num('subscribers', values.subscribers),
    };
    await runStreamBench(Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)));
    return;
  }
  if (which === 'service') {
    const { runServiceBench } = await import('../bench/service-bench.js');
    const opts = {
      rounds: num('rounds', values.rounds),
      durationSec: num('duration', values.duration),
      warmupSec: num('warmup', values.warmup),
      connections: num('connections', values.connections),
      jobs: num('jobs', values.jobs),
      logLevel: values['log-level'],
    };
    await runServiceBench(Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)));
    return;
  }
  const { memoryProbe, runEngineBench } = await import('../bench/engine-bench.js');
  if (values['memory-probe']) return memoryProbe(values['memory-probe']);
  await runEngineBench({
    ...(values.rounds ? { rounds: Number(values.rounds) } : {}),
    ...(values.threads ? { threads: Number(values.threads) } : {}),
    skipMemory: values['no-memory'] ?? false,
    batchingOnly: values['batching-only'] ?? false,
  });
}

/** A command resolves when done; a number is its exit code (api and worker report how they stopped). */
const commands: Record<string, (argv: string[]) => Promise<void | number>> = {
  generate: generateCommand,
  tokenize: tokenizeCommand,
  'make-test-models': makeTestModelsCommand,
  bench,
  api: apiCommand,
  worker: workerCommand,
  migrate: migrateCommand,
  demo: demoCommand,
  keys: async (argv) => (await import('./keys.js')).keysCommand(argv),
  tenants: async (argv) => (await import('./keys.js')).tenantsCommand(argv),
  doctor: async (argv) => (await import('./doctor.js')).doctorCommand(argv),
  'check-libs': async (argv) => (await import('./check-libs.js')).checkLibsCommand(argv),
  models: async (argv) => (await import('./models.js')).modelsCommand(argv),
};

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === 'help' || name === '--help' || name === '-h') {
    process.stdout.write(HELP);
    return name ? 0 : 1;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`unknown command "${name}"\n\n${HELP}`);
    return 1;
  }
  try {
    return (await command(rest)) ?? 0;
  } catch (err) {
    const e = err as Error & { code?: string };
    // Usage and argument-parsing mistakes get one line; anything else its stack, for bug reports.
    if (e instanceof UsageError || e.code?.startsWith('ERR_PARSE_ARGS')) process.stderr.write(`t2i ${name}: ${e.message}\n`);
    else process.stderr.write(`t2i ${name}: ${e.message}\n${process.env.T2I_DEBUG ? `${e.stack}\n` : ''}`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
