/**
 * The shipping files (docker-compose.yml, Dockerfile.api, Dockerfile.worker, .dockerignore,
 * deploy/kubernetes, and the observability configs when present) checked against the code:
 * the env schema, the listen ports and health routes, the CLI commands, the build layout and
 * the metric names. No Docker engine or cluster is needed; `docker compose config` and
 * `kubectl kustomize` run when those clients exist, and are skipped with a note otherwise.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { envSchema, loadConfig, type Role } from '../../src/config.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const rel = (p: string) => path.join(ROOT, p);
const read = (p: string) => readFileSync(rel(p), 'utf8');

/**
 * Parsed YAML: its shape is what the assertions below check, field by field, so it is not typed
 * up front.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Yaml = any;

/** Compose and Kubernetes both accept YAML merge keys (<<); parse the way they do. */
function yamlFile(p: string): Yaml {
  const docs = parseAllDocuments(read(p), { merge: true });
  const list = Array.isArray(docs) ? docs : [docs];
  for (const d of list)
    expect(
      d.errors.map((e) => e.message),
      `YAML errors in ${p}`,
    ).toEqual([]);
  return list.map((d) => d.toJS({ maxAliasCount: -1 }) as Yaml).filter((d) => d != null);
}

// --- What the code says ------------------------------------------------------------------------

const shape = envSchema.shape as Record<string, { safeParse(v: unknown): { success: boolean; data?: unknown } }>;
/** Variables without a default that are not optional: every process must be given them. */
const REQUIRED = Object.keys(shape).filter((k) => !shape[k]!.safeParse(undefined).success);
const defaultOf = (k: string) => shape[k]!.safeParse(undefined).data;
const API_PORT = defaultOf('PORT') as number;
const WORKER_PORT = defaultOf('WORKER_METRICS_PORT') as number;

/** `NAME=value` lines of .env.example that set a value (commented lines are defaults). */
function envExample(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of read('.env.example').split('\n')) {
    const m = /^([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
    if (m && m[2]!.trim() !== '') out[m[1]!] = m[2]!;
  }
  return out;
}
const ENV_EXAMPLE = envExample();

/** Every .ts file under src/, except the generated Prisma client. */
function sourceFiles(dir = rel('src')): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) return p.endsWith(`${path.sep}generated`) ? [] : sourceFiles(p);
    return p.endsWith('.ts') ? [p] : [];
  });
}
const srcText = (p: string) => read(p);

describe('the code these files are checked against', () => {
  it('has the required variables, ports and routes this test assumes', () => {
    expect(REQUIRED.sort()).toEqual(['DATABASE_URL', 'STORAGE_ACCESS_KEY', 'STORAGE_ENDPOINT', 'STORAGE_SECRET_KEY']);
    expect(API_PORT).toBe(8000);
    expect(WORKER_PORT).toBe(9191);
    expect(srcText('src/api/app.ts')).toContain("app.get('/healthz'");
    expect(srcText('src/api/app.ts')).toContain("app.get('/readyz'");
    expect(srcText('src/worker/health.ts')).toContain("app.get('/healthz'");
    const cli = srcText('src/cli/main.ts');
    for (const c of ['api', 'worker', 'migrate']) expect(cli, `t2i ${c}`).toMatch(new RegExp(`\\b${c}: ${c}Command\\b`));
    // bin/t2i.js runs the compiled CLI at dist/src/cli/main.js: tsc must emit there.
    expect(read('bin/t2i.js')).toContain("'../dist/src/cli/main.js'");
    const ts = JSON.parse(read('tsconfig.json')) as { compilerOptions: { outDir: string; rootDir: string } };
    expect(ts.compilerOptions).toMatchObject({ outDir: 'dist', rootDir: '.' });
    expect(JSON.parse(read('tsconfig.build.json'))).toMatchObject({ extends: './tsconfig.json', include: ['src'] });
    expect(JSON.parse(read('package.json')).scripts.build).toBe('tsc -p tsconfig.build.json');
  });
});

// --- docker-compose.yml ------------------------------------------------------------------------

/**
 * Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err} and
 * $$, with variables from .env (here .env.example, as `cp .env.example .env` gives).
 */
function interpolate(text: string, vars: Record<string, string>, missing: Set<string>): string {
  return text.replace(
    /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (all, name?: string, op?: string, arg?: string, bare?: string) => {
      if (all === '$$') return '$';
      const n = (name ?? bare)!;
      const v = vars[n];
      const unset = v === undefined || (op?.startsWith(':') === true && v === '');
      if (!unset) return v;
      if (op === ':-' || op === '-') return arg ?? '';
      missing.add(n);
      return '';
    },
  );
}
function interpolateDeep(v: Yaml, vars: Record<string, string>, missing: Set<string>): Yaml {
  if (typeof v === 'string') return interpolate(v, vars, missing);
  if (Array.isArray(v)) return v.map((x) => interpolateDeep(x, vars, missing));
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, interpolateDeep(x, vars, missing)]));
  return v;
}

const composeRaw: Yaml = yamlFile('docker-compose.yml')[0];
const composeMissing = new Set<string>();
const compose: Yaml = interpolateDeep(composeRaw, ENV_EXAMPLE, composeMissing);
const services: Record<string, Yaml> = compose.services;

const APP_SERVICES: Record<string, Role> = { migrate: 'any', api: 'api', 'worker-gpu': 'worker', 'worker-cpu': 'worker' };
const WORKERS = ['worker-gpu', 'worker-cpu'];

function environmentOf(svc: Yaml): Record<string, string> {
  const env = svc.environment ?? {};
  if (Array.isArray(env)) return Object.fromEntries(env.map((e: string) => [e.split('=')[0], e.split('=').slice(1).join('=')]));
  return Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)]));
}
/** What the process in a service sees: env_file .env (from .env.example), then `environment`. */
function effectiveEnv(name: string): Record<string, string> {
  const svc = services[name];
  const files = ([] as Yaml[]).concat(svc.env_file ?? []).map((f: Yaml) => (typeof f === 'string' ? f : f.path));
  expect(files, `${name}: env_file`).toEqual(['.env']);
  return { ...ENV_EXAMPLE, ...environmentOf(svc) };
}
const healthText = (hc: Yaml) => ([] as string[]).concat(hc?.test ?? []).join(' ');
function dependsOn(svc: Yaml): Record<string, string> {
  const d = svc.depends_on ?? {};
  if (Array.isArray(d)) return Object.fromEntries(d.map((n: string) => [n, 'service_started']));
  return Object.fromEntries(Object.entries(d).map(([k, v]) => [k, (v as { condition: string }).condition]));
}
/** "127.0.0.1:8000:8000" and long syntax -> host ip, published and container ports. */
function publishedPorts(svc: Yaml): { hostIp: string; published: number; target: number }[] {
  return (svc.ports ?? []).map((p: Yaml) => {
    if (typeof p === 'object') return { hostIp: p.host_ip ?? '', published: Number(p.published), target: Number(p.target) };
    const parts = String(p).split(':');
    const target = Number(parts.pop());
    const published = Number(parts.pop() ?? target);
    return { hostIp: parts.join(':'), published, target };
  });
}
/** Volume mounts as {source, target, readOnly}. */
function mounts(svc: Yaml): { source: string; target: string; readOnly: boolean }[] {
  return (svc.volumes ?? []).map((v: Yaml) => {
    if (typeof v === 'object') return { source: v.source, target: v.target, readOnly: v.read_only === true };
    const [source, target, mode] = String(v).split(':');
    return { source: source!, target: target!, readOnly: (mode ?? '').split(',').includes('ro') };
  });
}
const isInside = (p: string, dir: string) => p === dir || p.startsWith(dir.endsWith('/') ? dir : `${dir}/`);
/** Names a service answers to on the compose network: its name and its aliases. */
function namesOf(name: string): string[] {
  const nets = services[name]?.networks;
  const aliases = nets && !Array.isArray(nets) ? Object.values(nets).flatMap((n: Yaml) => n?.aliases ?? []) : [];
  return [name, ...aliases];
}

describe('docker-compose.yml', () => {
  it('has the services and worker profiles the deployment guide describes', () => {
    for (const s of ['postgres', 'redis', 'minio', 'minio-init', 'migrate', 'api', 'worker-gpu', 'worker-cpu', 'prometheus', 'grafana']) {
      expect(services[s], `service ${s}`).toBeDefined();
    }
    expect(services['worker-gpu'].profiles).toEqual(['gpu']);
    expect(services['worker-cpu'].profiles).toEqual(['cpu']);
    for (const s of Object.keys(services).filter((s) => !WORKERS.includes(s))) expect(services[s].profiles, `${s} runs in every profile`).toBeUndefined();
  });

  it('interpolates only variables that .env.example defines, or that have a default', () => {
    expect([...composeMissing]).toEqual([]);
  });

  it.each(Object.entries(APP_SERVICES))('gives %s every required variable through .env, and a valid configuration', (name, role) => {
    const env = effectiveEnv(name);
    for (const k of [...REQUIRED, ...(role === 'worker' ? ['MODEL_DIR'] : [])]) {
      expect(env[k], `${name}: ${k} is set neither in .env.example nor in environment`).toBeTruthy();
    }
    // The real loader, as the process would run it: fails listing every invalid variable.
    expect(() => loadConfig(env, role)).not.toThrow();
  });

  it('runs the API on the port and health route of the code, listening on all interfaces', () => {
    const api = services.api;
    const config = loadConfig(effectiveEnv('api'), 'api');
    expect(config.HOST, 'HOST must be 0.0.0.0 in a container').toBe('0.0.0.0');
    expect(config.PORT).toBe(API_PORT);
    expect(publishedPorts(api).map((p) => p.target)).toEqual([config.PORT]);
    expect(api.command ?? null, 'the image CMD (t2i api)').toBeNull();
    const hc = healthText(api.healthcheck);
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.PORT || ${API_PORT}`);
  });

  it.each(WORKERS)('runs %s with its metrics/health port, the model read-only at MODEL_DIR, and a long stop grace', (name) => {
    const svc = services[name];
    const config = loadConfig(effectiveEnv(name), 'worker');
    expect(config.WORKER_METRICS_HOST, 'WORKER_METRICS_HOST must be 0.0.0.0 in a container').toBe('0.0.0.0');
    expect(config.WORKER_METRICS_PORT).toBe(WORKER_PORT);
    const hc = healthText(svc.healthcheck);
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.WORKER_METRICS_PORT || ${WORKER_PORT}`);
    // Workers scale (--scale): a fixed published port would collide.
    expect(svc.ports ?? []).toEqual([]);
    const model = mounts(svc).find((m) => isInside(config.MODEL_DIR!, m.target));
    expect(model, `a volume mounted at or above MODEL_DIR=${config.MODEL_DIR}`).toBeDefined();
    expect(model!.readOnly, 'the model is mounted read-only').toBe(true);
    expect(parseInt(String(svc.stop_grace_period), 10)).toBeGreaterThanOrEqual(120);
    expect(namesOf(name)).toContain('worker');
  });

  it('gives the GPU worker one NVIDIA GPU and CUDA, the CPU worker the CPU image', () => {
    const gpu = services['worker-gpu'];
    expect(gpu.environment.EXECUTION_PROVIDER).toBe('cuda');
    expect(gpu.build.args.VARIANT).toBe('cuda');
    expect(gpu.deploy.resources.reservations.devices).toEqual([{ driver: 'nvidia', count: 1, capabilities: ['gpu'] }]);
    const cpu = services['worker-cpu'];
    expect(cpu.environment.EXECUTION_PROVIDER).toBe('cpu');
    expect(cpu.build.args.VARIANT).toBe('cpu');
    expect(cpu.deploy).toBeUndefined();
  });

  it('orders startup: postgres -> migrate -> api and workers, after redis and the bucket', () => {
    expect(dependsOn(services.migrate)).toEqual({ postgres: 'service_healthy' });
    expect(services.migrate.command).toEqual(['node', 'bin/t2i.js', 'migrate']);
    expect(services.migrate.restart).toBe('no');
    const afterInit = { migrate: 'service_completed_successfully', redis: 'service_healthy', 'minio-init': 'service_completed_successfully' };
    for (const s of ['api', ...WORKERS]) expect(dependsOn(services[s]), s).toEqual(afterInit);
    expect(dependsOn(services['minio-init'])).toEqual({ minio: 'service_healthy' });
    expect(services.migrate.image, 'migrate runs the API image').toBe(services.api.image);
  });

  it('runs Postgres, Redis and MinIO with volumes and health checks; Redis never evicts', () => {
    expect(services.postgres.image).toBe('postgres:16');
    expect(healthText(services.postgres.healthcheck)).toContain('pg_isready');
    expect(services.redis.image).toBe('redis:7');
    const redisCmd = ([] as string[]).concat(services.redis.command).join(' ');
    expect(redisCmd).toContain('--appendonly yes');
    expect(redisCmd).toContain('--maxmemory-policy noeviction');
    expect(healthText(services.redis.healthcheck)).toContain('redis-cli ping');
    for (const s of ['postgres', 'redis', 'minio']) {
      expect(services[s].healthcheck, s).toBeDefined();
      const named = mounts(services[s]).filter((m) => Object.keys(compose.volumes ?? {}).includes(m.source));
      expect(named.length, `${s} keeps its data in a named volume`).toBe(1);
    }
    // The bucket is created and kept private.
    const init = ([] as string[]).concat(services['minio-init'].entrypoint ?? [], services['minio-init'].command ?? []).join(' ');
    expect(init).toContain('mc mb --ignore-existing');
    expect(init).toContain('mc anonymous set none');
  });

  it('takes the Postgres and MinIO accounts from the .env values the services use', () => {
    const raw = composeRaw.services;
    expect(raw.postgres.environment.T2I_DATABASE_URL).toMatch(/^\$\{DATABASE_URL[:?}]/);
    expect(raw.minio.environment.MINIO_ROOT_USER).toMatch(/^\$\{STORAGE_ACCESS_KEY[:?}]/);
    expect(raw.minio.environment.MINIO_ROOT_PASSWORD).toMatch(/^\$\{STORAGE_SECRET_KEY[:?}]/);
    // The entrypoint's URL parsing, run with sh as the image would.
    const script = services.postgres.entrypoint.at(-1).replace('exec docker-entrypoint.sh postgres', 'echo "$POSTGRES_USER|$POSTGRES_PASSWORD|$POSTGRES_DB"');
    const out = execFileSync('sh', ['-c', script], {
      env: { PATH: process.env.PATH, T2I_DATABASE_URL: 'postgresql://alice:pw-1_x@postgres:5432/images?schema=public' },
    })
      .toString()
      .trim();
    expect(out).toBe('alice|pw-1_x|images');
    // .env.example's own DATABASE_URL points at this service.
    expect(new URL(ENV_EXAMPLE.DATABASE_URL!).hostname).toBe('postgres');
  });

  it('writes no secret into the file: secret-looking settings are ${...} references', () => {
    for (const [name, svc] of Object.entries(composeRaw.services as Record<string, Yaml>)) {
      for (const [k, v] of Object.entries(environmentOf(svc))) {
        if (/PASSWORD|SECRET|ACCESS_KEY|TOKEN|DATABASE_URL|REDIS_URL/.test(k)) expect(v, `${name}.environment.${k}`).toMatch(/^\$\{[A-Z_]+(:?[-?][^}]*)?\}$/);
      }
    }
  });

  it('publishes ports on 127.0.0.1 by default, and never Postgres or Redis', () => {
    for (const [name, svc] of Object.entries(services)) {
      for (const p of publishedPorts(svc)) expect(p.hostIp, `${name} publishes ${p.published} on`).toBe('127.0.0.1');
    }
    expect(services.postgres.ports).toBeUndefined();
    expect(services.redis.ports).toBeUndefined();
    // The S3 port browsers use for presigned URLs is the one published.
    const pub = new URL(ENV_EXAMPLE.STORAGE_PUBLIC_ENDPOINT!);
    expect(publishedPorts(services.minio).map((p) => p.published)).toContain(Number(pub.port));
    expect(new URL(ENV_EXAMPLE.STORAGE_ENDPOINT!).hostname).toBe('minio');
  });

  it('builds from contexts and Dockerfiles that exist, with build args the Dockerfile declares', () => {
    const built = Object.entries(services).filter(([, s]) => s.build);
    expect(built.map(([n]) => n).sort()).toEqual(['api', 'migrate', 'worker-cpu', 'worker-gpu']);
    for (const [name, svc] of built) {
      const b = typeof svc.build === 'string' ? { context: svc.build } : svc.build;
      const ctx = path.resolve(ROOT, b.context);
      expect(existsSync(ctx), `${name}: context ${b.context}`).toBe(true);
      const dockerfile = path.join(ctx, b.dockerfile ?? 'Dockerfile');
      expect(existsSync(dockerfile), `${name}: ${dockerfile}`).toBe(true);
      const df = dockerfileOf(path.relative(ROOT, dockerfile));
      for (const arg of Object.keys(b.args ?? {})) expect(Object.keys(df.args), `${name}: build arg ${arg}`).toContain(arg);
    }
  });

  it('mounts the Prometheus and Grafana configs from deploy/', () => {
    const prom = mounts(services.prometheus);
    expect(prom).toContainEqual({ source: './deploy/prometheus/prometheus.yml', target: '/etc/prometheus/prometheus.yml', readOnly: true });
    expect(prom).toContainEqual({ source: './deploy/prometheus/alerts.yml', target: '/etc/prometheus/alerts.yml', readOnly: true });
    expect(([] as string[]).concat(services.prometheus.command)).toContain('--config.file=/etc/prometheus/prometheus.yml');
    const graf = mounts(services.grafana);
    expect(graf).toContainEqual({ source: './deploy/grafana/provisioning', target: '/etc/grafana/provisioning', readOnly: true });
    expect(graf).toContainEqual({ source: './deploy/grafana/dashboards', target: '/var/lib/grafana/dashboards', readOnly: true });
  });

  const composeCli = findComposeCli();
  it.skipIf(!composeCli)(
    composeCli
      ? `passes \`${composeCli.join(' ')} config\` with .env copied from .env.example`
      : '`docker compose config` [skipped: no docker compose or docker-compose client here]',
    () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 't2i-compose-'));
      try {
        let text = read('docker-compose.yml');
        // docker-compose v1 predates the top-level `name`; the project name is not what is checked.
        if (composeCli![0] === 'docker-compose') text = text.replace(/^name: .*$/m, '');
        writeFileSync(path.join(dir, 'docker-compose.yml'), text);
        writeFileSync(path.join(dir, '.env'), read('.env.example'));
        const r = spawnSync(composeCli![0]!, [...composeCli!.slice(1), '--profile', 'gpu', '--profile', 'cpu', 'config', '-q'], { cwd: dir, encoding: 'utf8' });
        expect(r.stderr + r.stdout, 'compose config').toBe('');
        expect(r.status).toBe(0);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});

function findComposeCli(): string[] | undefined {
  for (const cli of [['docker', 'compose'], ['docker-compose']]) {
    const r = spawnSync(cli[0]!, [...cli.slice(1), 'version'], { encoding: 'utf8' });
    if (r.status === 0) return cli;
  }
  return undefined;
}

// --- Dockerfiles ---------------------------------------------------------------------------------

interface Instruction {
  op: string;
  args: string;
}
interface Stage {
  from: string;
  name?: string;
  body: Instruction[];
}
interface Dockerfile {
  args: Record<string, string | undefined>;
  stages: Stage[];
}

function dockerfileOf(p: string): Dockerfile {
  const lines = read(p)
    .replace(/\\\n/g, ' ')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const df: Dockerfile = { args: {}, stages: [] };
  for (const line of lines) {
    const [op, ...rest] = line.split(/\s+/);
    const ins = { op: op!.toUpperCase(), args: rest.join(' ') };
    if (ins.op === 'FROM') {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args)!;
      df.stages.push({ from: m[1]!, ...(m[2] ? { name: m[2] } : {}), body: [] });
    } else if (df.stages.length === 0) {
      if (ins.op === 'ARG') {
        const [k, v] = ins.args.split('=');
        df.args[k!] = v;
      }
    } else {
      df.stages.at(-1)!.body.push(ins);
      if (ins.op === 'ARG') df.args[ins.args.split('=')[0]!] ??= undefined;
    }
  }
  return df;
}
const expand = (s: string, args: Record<string, string | undefined>) => s.replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a?: string, b?: string) => args[(a ?? b)!] ?? '');
const ops = (stage: Stage, op: string) => stage.body.filter((i) => i.op === op).map((i) => i.args);
/** COPY's [--flags] src... dest, JSON or plain form. */
function copyArgs(args: string): { flags: string[]; sources: string[]; dest: string } {
  const words = args.split(/\s+/);
  const flags = words.filter((w) => w.startsWith('--'));
  const rest = words.filter((w) => !w.startsWith('--'));
  const all = rest[0]?.startsWith('[') ? (JSON.parse(rest.join(' ')) as string[]) : rest;
  return { flags, sources: all.slice(0, -1), dest: all.at(-1)! };
}
const cmdOf = (stage: Stage) => JSON.parse(ops(stage, 'CMD').at(-1)!) as string[];

/** .dockerignore as Docker reads it: patterns in order, later ones (and !) winning. */
function dockerignored(file: string): boolean {
  const patterns = read('.dockerignore')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const toRe = (p: string) =>
    new RegExp(
      `^${p
        .replace(/^\//, '')
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*\*/g, '\u0000')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')
        .replace(/\u0000/g, '.*')}(/.*)?$`,
    );
  let ignored = false;
  for (const p of patterns) {
    const negate = p.startsWith('!');
    if (toRe(negate ? p.slice(1) : p).test(file)) ignored = !negate;
  }
  return ignored;
}

function checkDockerfile(p: string, variants: Record<string, string | undefined>[]) {
  for (const vars of variants) {
    const df = dockerfileOf(p);
    const args = { ...df.args, ...vars };
    const names = new Set<string>();
    for (const stage of df.stages) {
      const from = expand(stage.from, args);
      // A FROM naming a stage must name an earlier one; otherwise it is an image reference.
      if (/^runtime-|^build$|^deps$/.test(from)) expect(names, `${p} (${JSON.stringify(vars)}): FROM ${from}`).toContain(from);
      for (const c of ops(stage, 'COPY').map(copyArgs)) {
        const fromFlag = c.flags.find((f) => f.startsWith('--from='))?.slice('--from='.length);
        if (fromFlag) {
          if (!fromFlag.includes(':')) expect(names, `${p}: COPY --from=${fromFlag}`).toContain(fromFlag);
          continue;
        }
        for (const s of c.sources) {
          expect(existsSync(rel(s)), `${p}: COPY ${s} (not in the repository)`).toBe(true);
          expect(dockerignored(s.replace(/^\.\//, '').replace(/\/$/, '')), `${p}: COPY ${s} is excluded by .dockerignore`).toBe(false);
        }
      }
      if (stage.name) names.add(stage.name);
    }
    const final = df.stages.at(-1)!;
    const user = ops(final, 'USER').at(-1);
    expect(user, `${p}: final stage runs as a non-root USER`).toBeDefined();
    expect(user!.split(':')[0]).not.toMatch(/^(root|0)$/);
  }
}

/** The RUN lines of a stage in order, with the COPY sources seen before each. */
function runsAfterCopies(stage: Stage): { run: string; copied: string[] }[] {
  const copied: string[] = [];
  const out: { run: string; copied: string[] }[] = [];
  for (const i of stage.body) {
    if (i.op === 'COPY') copied.push(...copyArgs(i.args).sources);
    if (i.op === 'RUN') out.push({ run: i.args, copied: [...copied] });
  }
  return out;
}

/** The build stage: npm ci (which generates the Prisma client) with .npmrc, then the build. */
function checkBuildStage(p: string) {
  const build = dockerfileOf(p).stages.find((s) => s.name === 'build')!;
  expect(build, `${p}: a build stage`).toBeDefined();
  expect(build.from).toBe('${NODE_IMAGE}');
  const runs = runsAfterCopies(build);
  const ci = runs.find((r) => /^npm ci$/.test(r.run));
  expect(ci, `${p}: npm ci with dev dependencies`).toBeDefined();
  // .npmrc skips onnxruntime-node's CUDA download; the postinstall needs the prisma schema and config.
  for (const f of ['.npmrc', 'package-lock.json', 'scripts/prisma-generate.mjs', 'prisma.config.ts', 'prisma'])
    expect(ci!.copied, `${p}: ${f} before npm ci`).toContain(f);
  const b = runs.find((r) => r.run === 'npm run build');
  expect(b, `${p}: npm run build`).toBeDefined();
  for (const f of ['tsconfig.json', 'tsconfig.build.json', 'src'])
    expect(
      b!.copied.map((s) => s.replace(/^\.\//, '')),
      `${p}: ${f} before the build`,
    ).toContain(f);
  expect(read('.npmrc')).toMatch(/^onnxruntime-node-install=skip$/m);
  expect(JSON.parse(read('package.json')).scripts.postinstall).toContain('scripts/prisma-generate.mjs');
}

describe('Dockerfile.api', () => {
  const df = dockerfileOf('Dockerfile.api');
  const runtime = df.stages.at(-1)!;

  it('builds on node:22-bookworm-slim: npm ci, Prisma client, npm run build', () => {
    expect(df.args.NODE_IMAGE).toBe('node:22-bookworm-slim');
    checkBuildStage('Dockerfile.api');
  });

  it('ships production dependencies, dist/, bin/ and the migrations, as a non-root user', () => {
    checkDockerfile('Dockerfile.api', [{}]);
    expect(ops(runtime, 'RUN').join('\n')).toMatch(/npm ci --omit=dev/);
    const copies = ops(runtime, 'COPY').map(copyArgs);
    expect(copies).toContainEqual({ flags: ['--from=build'], sources: ['/app/dist'], dest: './dist' });
    expect(copies.flatMap((c) => c.sources)).toEqual(expect.arrayContaining(['bin', 'prisma', 'package.json']));
    // `t2i migrate` finds prisma/migrations by walking up from the compiled module.
    expect(existsSync(rel('prisma/migrations'))).toBe(true);
  });

  it('exposes the API port, health-checks /healthz and runs `t2i api`', () => {
    expect(ops(runtime, 'EXPOSE')).toEqual([String(API_PORT)]);
    const hc = ops(runtime, 'HEALTHCHECK').join(' ');
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.PORT || ${API_PORT}`);
    expect(cmdOf(runtime)).toEqual(['node', 'bin/t2i.js', 'api']);
  });
});

describe('Dockerfile.worker', () => {
  const df = dockerfileOf('Dockerfile.worker');
  const runtime = df.stages.at(-1)!;

  it('selects a CUDA 12 + cuDNN or a plain Node runtime by VARIANT', () => {
    expect(df.args.VARIANT).toBe('cuda');
    expect(df.args.CUDA_IMAGE).toMatch(/^nvidia\/cuda:12\.\d+\.\d+-cudnn9?-runtime-ubuntu2[24]\.04$/);
    expect(df.args.NODE_IMAGE).toBe('node:22-bookworm-slim');
    expect(runtime.from).toBe('runtime-${VARIANT}');
    const byName = Object.fromEntries(df.stages.filter((s) => s.name).map((s) => [s.name, s.from]));
    expect(byName['runtime-cuda']).toBe('${CUDA_IMAGE}');
    expect(byName['runtime-cpu']).toBe('${NODE_IMAGE}');
    // Node comes from the node image into the CUDA one.
    expect(
      ops(
        df.stages.find((s) => s.name === 'runtime-cuda')!,
        'COPY',
      ),
    ).toContain('--from=deps /usr/local/bin/node /usr/local/bin/node');
  });

  it('builds like the API and ships dist/ and bin/, as a non-root user, for both variants', () => {
    checkBuildStage('Dockerfile.worker');
    checkDockerfile('Dockerfile.worker', [{ VARIANT: 'cuda' }, { VARIANT: 'cpu' }]);
    const copies = ops(runtime, 'COPY').map(copyArgs);
    expect(copies).toContainEqual({ flags: ['--from=build'], sources: ['/app/dist'], dest: './dist' });
    expect(copies).toContainEqual({ flags: ['--from=deps'], sources: ['/app/node_modules'], dest: './node_modules' });
  });

  it("installs onnxruntime-node's CUDA 12 provider for the cuda variant only", () => {
    const deps = df.stages.find((s) => s.name === 'deps')!;
    const run = ops(deps, 'RUN').join('\n');
    expect(run).toMatch(/npm ci --omit=dev/);
    expect(run).toContain('cuda) ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js');
    expect(existsSync(rel('node_modules/onnxruntime-node/script/install.js')), 'the install script the Dockerfile runs').toBe(true);
    // What src/engine/onnx/runtime.ts looks for to offer the CUDA provider.
    expect(run).toContain('libonnxruntime_providers_cuda.so');
    expect(srcText('src/engine/onnx/runtime.ts')).toContain('libonnxruntime_providers_cuda.so');
  });

  it('mounts the model at /models, exposes the metrics port, health-checks /healthz and runs `t2i worker`', () => {
    expect(ops(runtime, 'VOLUME')).toEqual(['["/models"]']);
    expect(ops(runtime, 'ENV').join(' ')).toMatch(/MODEL_DIR=\/models\b/);
    expect(ops(runtime, 'EXPOSE')).toEqual([String(WORKER_PORT)]);
    const hc = ops(runtime, 'HEALTHCHECK').join(' ');
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.WORKER_METRICS_PORT || ${WORKER_PORT}`);
    expect(cmdOf(runtime)).toEqual(['node', 'bin/t2i.js', 'worker']);
  });
});

describe('.dockerignore', () => {
  it('keeps secrets, local state and dependencies out of the build context', () => {
    for (const f of ['.env', '.env.local', 'node_modules', 'dist', '.git', 'src/generated', 'models', '.t2i']) expect(dockerignored(f), f).toBe(true);
    for (const f of ['src', 'bin', 'prisma', 'package.json', 'package-lock.json', '.npmrc', 'scripts/prisma-generate.mjs'])
      expect(dockerignored(f), f).toBe(false);
  });
});

// --- Kubernetes --------------------------------------------------------------------------------

const K8S = 'deploy/kubernetes';
const kustomization: Yaml = yamlFile(`${K8S}/kustomization.yaml`)[0];
const k8sDocs: Yaml[] = (kustomization.resources as string[]).flatMap((r) => yamlFile(`${K8S}/${r}`));
const kind = (k: string) => k8sDocs.filter((d) => d.kind === k);
const named = (k: string, name: string) => {
  const d = k8sDocs.find((x) => x.kind === k && x.metadata.name === name);
  expect(d, `${k}/${name}`).toBeDefined();
  return d;
};
const podSpec = (d: Yaml) => d.spec.template.spec;
const container = (d: Yaml) => podSpec(d).containers[0];

/** What a container's process sees: envFrom ConfigMaps and Secrets, then env. */
function k8sEnv(c: Yaml): Record<string, string> {
  const env: Record<string, string> = {};
  for (const from of c.envFrom ?? []) {
    if (from.configMapRef) Object.assign(env, named('ConfigMap', from.configMapRef.name).data);
    if (from.secretRef) {
      const s = named('Secret', from.secretRef.name);
      Object.assign(env, Object.fromEntries(Object.entries(s.data ?? {}).map(([k, v]) => [k, Buffer.from(String(v), 'base64').toString()])), s.stringData);
    }
  }
  for (const e of c.env ?? []) if (e.value !== undefined) env[e.name] = e.value;
  return env;
}
/** A probe's or annotation's port, resolving a named container port. */
function portNumber(c: Yaml, port: number | string): number {
  if (typeof port === 'number') return port;
  const p = (c.ports ?? []).find((x: Yaml) => x.name === port);
  return p ? p.containerPort : Number(port);
}

describe('deploy/kubernetes', () => {
  it('lists every manifest of the folder in kustomization.yaml', () => {
    const files = readdirSync(rel(K8S)).filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml');
    expect([...(kustomization.resources as string[])].sort()).toEqual(files.sort());
    expect(kustomization.namespace).toBe('t2i');
    expect(named('Namespace', 't2i')).toBeDefined();
  });

  it('gives every object apiVersion, kind and a name, in the t2i namespace, with string labels and annotations', () => {
    for (const d of k8sDocs) {
      expect(d.apiVersion, JSON.stringify(d.metadata)).toMatch(/^([a-z0-9.-]+\/)?v\d+((alpha|beta)\d+)?$/);
      expect(d.kind).toMatch(/^[A-Z][A-Za-z]+$/);
      expect(d.metadata?.name).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/);
      if (d.kind !== 'Namespace') expect(d.metadata.namespace ?? 't2i', `${d.kind}/${d.metadata.name}`).toBe('t2i');
      const meta = [d.metadata, d.spec?.template?.metadata].filter(Boolean);
      // A number or boolean there is rejected by the API server (e.g. prometheus.io/port: 8000).
      for (const m of meta)
        for (const v of [...Object.values(m.labels ?? {}), ...Object.values(m.annotations ?? {})])
          expect(typeof v, `${d.kind}/${d.metadata.name}: ${v}`).toBe('string');
    }
    for (const cm of kind('ConfigMap')) for (const [k, v] of Object.entries(cm.data ?? {})) expect(typeof v, `ConfigMap ${k} must be a string`).toBe('string');
    for (const s of kind('Secret')) for (const [k, v] of Object.entries(s.stringData ?? {})) expect(typeof v, `Secret ${k} must be a string`).toBe('string');
  });

  it('matches each workload selector to its pod template labels, and the Service to the API pods', () => {
    for (const d of [...kind('Deployment'), ...kind('Job')]) {
      const labels = d.spec.template.metadata.labels;
      if (d.kind === 'Deployment') expect(labels).toMatchObject(d.spec.selector.matchLabels);
      for (const c of podSpec(d).containers) {
        expect(c.name).toBeTruthy();
        expect(
          (kustomization.images as Yaml[]).map((i) => i.name),
          `${d.metadata.name}: image ${c.image} is set by kustomization images`,
        ).toContain(c.image);
        for (const e of c.env ?? []) if (e.value !== undefined) expect(typeof e.value, `${e.name} must be a string`).toBe('string');
      }
    }
    const svc = named('Service', 't2i-api');
    const api = named('Deployment', 't2i-api');
    expect(api.spec.template.metadata.labels).toMatchObject(svc.spec.selector);
    for (const p of svc.spec.ports) expect(portNumber(container(api), p.targetPort)).toBe(API_PORT);
  });

  it('keeps credentials in the Secret, as obvious placeholders, and the rest in the ConfigMap', () => {
    const secret = named('Secret', 't2i-secrets');
    const cm = named('ConfigMap', 't2i-config');
    for (const k of ['DATABASE_URL', 'REDIS_URL', 'STORAGE_ACCESS_KEY', 'STORAGE_SECRET_KEY']) {
      expect(Object.keys(secret.stringData), k).toContain(k);
      expect(Object.keys(cm.data), k).not.toContain(k);
      expect(secret.stringData[k], `${k} is a placeholder`).toMatch(/CHANGE-ME/);
    }
    expect(secret.data).toBeUndefined();
    for (const k of Object.keys(cm.data)) expect(Object.keys(shape), `ConfigMap ${k} is a t2i variable`).toContain(k);
  });

  const workloads: [string, string, Role, string][] = [
    ['Deployment', 't2i-api', 'api', 'api'],
    ['Deployment', 't2i-worker', 'worker', 'worker'],
    ['Job', 't2i-migrate', 'any', 'migrate'],
  ];
  it.each(workloads)('gives %s/%s every required variable and a valid configuration', (k, name, role, command) => {
    const c = container(named(k, name));
    expect(c.command).toEqual(['node', 'bin/t2i.js', command]);
    const env = k8sEnv(c);
    for (const v of [...REQUIRED, ...(role === 'worker' ? ['MODEL_DIR'] : [])]) expect(env[v], `${name}: ${v}`).toBeTruthy();
    expect(() => loadConfig(env, role)).not.toThrow();
    const sc = podSpec(named(k, name)).securityContext;
    expect(sc.runAsNonRoot).toBe(true);
    expect(c.resources?.requests, `${name}: resource requests`).toBeDefined();
    expect(c.resources?.limits?.memory, `${name}: memory limit`).toBeDefined();
  });

  it('runs 2 API replicas: ready on /readyz, alive on /healthz, on the port of the code, scraped at /metrics', () => {
    const api = named('Deployment', 't2i-api');
    const c = container(api);
    const config = loadConfig(k8sEnv(c), 'api');
    expect(api.spec.replicas).toBe(2);
    expect(config.HOST).toBe('0.0.0.0');
    expect(c.ports.map((p: Yaml) => p.containerPort)).toEqual([config.PORT]);
    expect(config.PORT).toBe(API_PORT);
    expect(c.readinessProbe.httpGet.path).toBe('/readyz');
    expect(c.livenessProbe.httpGet.path).toBe('/healthz');
    expect(portNumber(c, c.readinessProbe.httpGet.port)).toBe(API_PORT);
    expect(portNumber(c, c.livenessProbe.httpGet.port)).toBe(API_PORT);
    expect(api.spec.template.metadata.annotations).toEqual({
      'prometheus.io/scrape': 'true',
      'prometheus.io/port': String(API_PORT),
      'prometheus.io/path': '/metrics',
    });
  });

  it('runs workers on one GPU each, the model from a ReadOnlyMany PVC, with a long grace period and scraped on 9191', () => {
    const w = named('Deployment', 't2i-worker');
    const c = container(w);
    const config = loadConfig(k8sEnv(c), 'worker');
    expect(config.EXECUTION_PROVIDER).toBe('cuda');
    expect(config.WORKER_METRICS_HOST).toBe('0.0.0.0');
    expect(config.WORKER_METRICS_PORT).toBe(WORKER_PORT);
    expect(String(c.resources.limits['nvidia.com/gpu'])).toBe('1');
    expect(String(c.resources.requests['nvidia.com/gpu'] ?? c.resources.limits['nvidia.com/gpu'])).toBe('1');
    expect(podSpec(w).terminationGracePeriodSeconds).toBeGreaterThanOrEqual(120);
    const mount = c.volumeMounts.find((m: Yaml) => isInside(config.MODEL_DIR!, m.mountPath));
    expect(mount, 'a volume mounted at or above MODEL_DIR').toBeDefined();
    expect(mount.readOnly).toBe(true);
    const vol = podSpec(w).volumes.find((v: Yaml) => v.name === mount.name);
    const pvc = named('PersistentVolumeClaim', vol.persistentVolumeClaim.claimName);
    expect(pvc.spec.accessModes).toContain('ReadOnlyMany');
    for (const probe of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
      expect(c[probe].httpGet.path, probe).toBe('/healthz');
      expect(portNumber(c, c[probe].httpGet.port), probe).toBe(WORKER_PORT);
    }
    expect(c.ports.map((p: Yaml) => p.containerPort)).toEqual([WORKER_PORT]);
    const ann = w.spec.template.metadata.annotations;
    expect(ann).toEqual({ 'prometheus.io/scrape': 'true', 'prometheus.io/port': String(config.WORKER_METRICS_PORT), 'prometheus.io/path': '/metrics' });
  });

  it('runs the migrations in a Job from the API image', () => {
    const job = named('Job', 't2i-migrate');
    expect(['Never', 'OnFailure']).toContain(podSpec(job).restartPolicy);
    expect(container(job).image).toBe(container(named('Deployment', 't2i-api')).image);
  });

  it('scales the workers with KEDA on the queue-depth metric the code exports', () => {
    const so = named('ScaledObject', 't2i-worker');
    expect(so.apiVersion).toBe('keda.sh/v1alpha1');
    expect(so.spec.scaleTargetRef.name).toBe(named('Deployment', 't2i-worker').metadata.name);
    expect(so.spec.maxReplicaCount).toBeGreaterThanOrEqual(so.spec.minReplicaCount ?? 0);
    expect(so.spec.triggers).toHaveLength(1);
    const t = so.spec.triggers[0];
    expect(t.type).toBe('prometheus');
    expect(t.metadata.serverAddress).toMatch(/^https?:\/\//);
    expect(Number(t.metadata.threshold)).toBeGreaterThan(0);
    expect(typeof t.metadata.threshold, 'KEDA metadata values are strings').toBe('string');
    const metric = /([a-zA-Z_:][a-zA-Z0-9_:]*)\{state="waiting"/.exec(t.metadata.query)?.[1];
    expect(metric).toBe('t2i_queue_jobs');
    const exporters = sourceFiles().filter((f) => readFileSync(f, 'utf8').includes(`'${metric}'`));
    expect(exporters, `no file under src/ defines the metric '${metric}' the ScaledObject queries`).not.toEqual([]);
  });

  const kubectl = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' }).status === 0;
  it.skipIf(!kubectl)(kubectl ? 'builds with `kubectl kustomize`' : '`kubectl kustomize` [skipped: no kubectl here]', () => {
    const out = execFileSync('kubectl', ['kustomize', rel(K8S)], { encoding: 'utf8' });
    const built = parseAllDocuments(out).map((d) => d.toJS() as Yaml);
    expect(built).toHaveLength(k8sDocs.length);
    for (const d of built) if (d.kind !== 'Namespace') expect(d.metadata.namespace).toBe('t2i');
    const images = built.flatMap((d) => d.spec?.template?.spec?.containers ?? []).map((c: Yaml) => c.image as string);
    for (const i of images) expect(i).toMatch(/^registry\.example\.com\/t2i\/(api|worker):/);
  });
});

// --- Observability configs (written separately; checked once they exist) -----------------------

const present = (p: string) => existsSync(rel(p));
const note = (p: string) => `[skipped: ${p} does not exist yet]`;

/** host:port targets of static_configs and dns_sd_configs, anywhere in a parsed config. */
function scrapeTargets(v: Yaml): string[] {
  if (Array.isArray(v)) return v.flatMap(scrapeTargets);
  if (!v || typeof v !== 'object') return [];
  const own: string[] = [];
  if (Array.isArray(v.targets)) own.push(...v.targets.filter((t: unknown) => typeof t === 'string'));
  if (Array.isArray(v.names) && v.port !== undefined) own.push(...v.names.map((n: string) => `${n}:${v.port}`));
  return [...own, ...Object.values(v).flatMap(scrapeTargets)];
}
/** The port a target must use when its host is a compose service (or alias) of ours. */
function expectedPort(host: string): number | undefined {
  if (namesOf('api').includes(host)) return API_PORT;
  if (WORKERS.some((w) => namesOf(w).includes(host))) return WORKER_PORT;
  return undefined;
}
function checkTargets(file: string, targets: string[]) {
  for (const t of targets) {
    const m = /^(?:https?:\/\/)?([^:/]+):(\d+)$/.exec(t);
    if (!m) continue;
    const want = expectedPort(m[1]!);
    if (want !== undefined) expect(Number(m[2]), `${file}: target ${t}`).toBe(want);
  }
  expect(
    targets.some((t) => t.endsWith(`:${WORKER_PORT}`)),
    `${file} scrapes a worker on :${WORKER_PORT}: ${targets.join(', ')}`,
  ).toBe(true);
}

describe('observability configs', () => {
  const prom = 'deploy/prometheus/prometheus.yml';
  it.skipIf(!present(prom))(`${prom} scrapes the compose services on the ports of the code ${present(prom) ? '' : note(prom)}`, () => {
    const cfg = yamlFile(prom)[0];
    const targets = scrapeTargets(cfg.scrape_configs);
    checkTargets(prom, targets);
    expect(
      targets.some((t) => expectedPort(t.split(':')[0]!) === API_PORT),
      `${prom} scrapes the API`,
    ).toBe(true);
    for (const job of cfg.scrape_configs) if (job.metrics_path !== undefined) expect(job.metrics_path, job.job_name).toBe('/metrics');
    // Rule files resolve, from /etc/prometheus, to files compose mounts.
    const mounted = mounts(services.prometheus).map((m) => m.target);
    for (const r of cfg.rule_files ?? []) expect(mounted, `rule file ${r}`).toContain(path.posix.resolve('/etc/prometheus', r));
  });

  const agent = 'grafana-agent.yaml';
  it.skipIf(!present(agent))(`${agent} scrapes the worker metrics port ${present(agent) ? '' : note(agent)}`, () => {
    // The agent runs with -config.expand-env: ${VAR:-default} is replaced before the YAML is
    // parsed, so parse what it sees with every variable unset (the defaults).
    const expanded = interpolate(read(agent), {}, new Set());
    const docs = parseAllDocuments(expanded);
    for (const d of docs)
      expect(
        d.errors.map((e) => e.message),
        `YAML errors in ${agent} after env expansion`,
      ).toEqual([]);
    checkTargets(agent, scrapeTargets(docs.map((d) => d.toJS() as Yaml)));
  });

  const ds = 'deploy/grafana/provisioning/datasources/prometheus.yml';
  it.skipIf(!present(ds))(`${ds} points Grafana at the compose Prometheus ${present(ds) ? '' : note(ds)}`, () => {
    const urls = (yamlFile(ds)[0].datasources as Yaml[]).map((d) => new URL(d.url));
    expect(
      urls.some((u) => u.hostname === 'prometheus' && u.port === '9090'),
      urls.join(', '),
    ).toBe(true);
    expect(publishedPorts(services.prometheus).map((p) => p.target)).toContain(9090);
  });

  const dash = 'deploy/grafana/provisioning/dashboards/t2i.yml';
  it.skipIf(!present(dash))(`${dash} loads dashboards from a folder compose mounts ${present(dash) ? '' : note(dash)}`, () => {
    const providers = yamlFile(dash)[0].providers as Yaml[];
    const grafanaMounts = mounts(services.grafana);
    for (const p of providers) {
      const m = grafanaMounts.find((x) => isInside(p.options.path, x.target));
      expect(m, `provider ${p.name}: ${p.options.path} is not mounted`).toBeDefined();
      const hostDir = path.join(rel(m!.source), path.posix.relative(m!.target, p.options.path));
      expect(existsSync(hostDir) && readdirSync(hostDir).some((f) => f.endsWith('.json')), `${hostDir} holds a dashboard`).toBe(true);
    }
  });
});
