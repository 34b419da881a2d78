/**
 * docker-compose.yml and the observability configs checked against the code (the env schema, the
 * listen ports and health routes, the CLI commands, the worker's shutdown timeline, the metric
 * names) and against the Compose Specification's JSON schema, without Docker. The Dockerfiles are
 * checked in deploy-images.test.ts, the Kubernetes manifests in deploy-kubernetes.test.ts.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { z } from 'zod';
import { loadConfig, type Role } from '../../src/config.js';
import { shutdownBudgetMs } from '../../src/worker/shutdown.js';
import {
  API_PORT,
  asList,
  composeFile,
  composeSchemaValidator,
  dependsOn,
  durationMs,
  environmentOf,
  envExample,
  healthText,
  interpolate,
  interpolateDeep,
  isInside,
  mounts,
  parseAs,
  publishedPorts,
  read,
  rel,
  REQUIRED,
  WORKER_PORT,
  yamlDocs,
  type ComposeService,
} from '../support/deploy-files.js';

const ENV_EXAMPLE = envExample();

describe('the code these files are checked against', () => {
  it('has the required variables, ports and routes these tests assume', () => {
    expect([...REQUIRED].sort()).toEqual(['DATABASE_URL', 'STORAGE_ACCESS_KEY', 'STORAGE_ENDPOINT', 'STORAGE_SECRET_KEY']);
    expect(API_PORT).toBe(8000);
    expect(WORKER_PORT).toBe(9191);
    expect(read('src/api/app.ts')).toContain("app.get('/healthz'");
    expect(read('src/api/app.ts')).toContain("app.get('/readyz'");
    expect(read('src/worker/health.ts')).toContain("app.get('/healthz'");
    const cli = read('src/cli/main.ts');
    for (const c of ['api', 'worker', 'migrate']) expect(cli, `t2i ${c}`).toMatch(new RegExp(`\\b${c}: ${c}Command\\b`));
    for (const c of ['doctor', 'check-libs', 'models']) expect(cli, `t2i ${c}`).toContain(`${c.includes('-') ? `'${c}'` : c}: async`);
    // bin/t2i.js runs the compiled CLI at dist/src/cli/main.js: tsc must emit there.
    expect(read('bin/t2i.js')).toContain("'../dist/src/cli/main.js'");
    const ts = z.object({ compilerOptions: z.looseObject({ outDir: z.string(), rootDir: z.string() }) }).parse(JSON.parse(read('tsconfig.json')));
    expect(ts.compilerOptions).toMatchObject({ outDir: 'dist', rootDir: '.' });
    expect(JSON.parse(read('tsconfig.build.json'))).toMatchObject({ extends: './tsconfig.json', include: ['src'] });
    // `npm run build` (the API image) compiles the code, then the web page; `build:server` (the worker image) only the code.
    const scripts = z.object({ scripts: z.record(z.string(), z.string()) }).parse(JSON.parse(read('package.json'))).scripts;
    expect(scripts.build).toBe('npm run build:server && npm run build:web');
    expect(scripts['build:server']).toBe('tsc -p tsconfig.build.json');
  });
});

// --- docker-compose.yml ------------------------------------------------------------------------

const composeRawDoc = yamlDocs('docker-compose.yml')[0];
const composeRaw = parseAs(composeFile, composeRawDoc, 'docker-compose.yml');
const composeMissing = new Set<string>();
const composeInterpolated = interpolateDeep(composeRawDoc, ENV_EXAMPLE, composeMissing);
const compose = parseAs(composeFile, composeInterpolated, 'docker-compose.yml after interpolation');
const services = compose.services;
const svc = (name: string): ComposeService => {
  const s = services[name];
  if (!s) throw new Error(`docker-compose.yml has no service ${name}`);
  return s;
};

const APP_SERVICES: Record<string, Role> = {
  migrate: 'any',
  api: 'api',
  'worker-gpu': 'worker',
  'worker-cpu': 'worker',
  'worker-sd15': 'worker',
  'worker-sdxl-turbo': 'worker',
};
/** The two-models profile: one worker per model. */
const MODEL_WORKERS = ['worker-sd15', 'worker-sdxl-turbo'];
const WORKERS = ['worker-gpu', 'worker-cpu', ...MODEL_WORKERS];

/** What the process in a service sees: env_file .env (from .env.example), then `environment`. */
function effectiveEnv(name: string): Record<string, string> {
  const s = svc(name);
  const files = (s.env_file === undefined ? [] : Array.isArray(s.env_file) ? s.env_file : [s.env_file]).map((f) => (typeof f === 'string' ? f : f.path));
  expect(files, `${name}: env_file`).toEqual(['.env']);
  return { ...ENV_EXAMPLE, ...environmentOf(s) };
}
/** Names a service answers to on the compose network: its name and its aliases. */
function namesOf(name: string): string[] {
  const nets = services[name]?.networks;
  const aliases = nets && !Array.isArray(nets) ? Object.values(nets).flatMap((n) => n?.aliases ?? []) : [];
  return [name, ...aliases];
}

describe('docker-compose.yml', () => {
  it('is valid against the Compose Specification, as written and after interpolation', () => {
    // What `docker compose config` checks first; this machine has no Docker (see docs/deployment.md).
    const validate = composeSchemaValidator();
    expect(validate(composeRawDoc).map((e) => `${e.instancePath} ${e.message}`)).toEqual([]);
    expect(validate(composeInterpolated).map((e) => `${e.instancePath} ${e.message}`)).toEqual([]);
    // The validator does reject what Compose rejects.
    const broken = structuredClone(composeInterpolated) as { services: Record<string, Record<string, unknown>> };
    broken.services.api!.stop_grace_period = 120;
    broken.services.api!.restart_policy = 'always';
    expect(validate(broken).map((e) => `${e.instancePath} ${e.message}`)).toEqual([
      '/services/api must NOT have additional properties',
      '/services/api/stop_grace_period must be string',
    ]);
  });

  it('has the services and worker profiles the deployment guide describes', () => {
    for (const s of ['postgres', 'redis', 'minio', 'minio-init', 'migrate', 'api', 'worker-gpu', 'worker-cpu', 'prometheus', 'grafana'])
      expect(services[s], `service ${s}`).toBeDefined();
    expect(svc('worker-gpu').profiles).toEqual(['gpu']);
    expect(svc('worker-cpu').profiles).toEqual(['cpu']);
    for (const w of MODEL_WORKERS) expect(svc(w).profiles, w).toEqual(['two-models']);
    for (const s of Object.keys(services).filter((s) => !WORKERS.includes(s))) expect(svc(s).profiles, `${s} runs in every profile`).toBeUndefined();
  });

  it('interpolates only variables that .env.example defines, or that have a default', () => {
    expect([...composeMissing]).toEqual([]);
  });

  it.each(Object.entries(APP_SERVICES))('gives %s every required variable through .env, and a valid configuration', (name, role) => {
    const env = effectiveEnv(name);
    for (const k of REQUIRED) expect(env[k], `${name}: ${k} is set neither in .env.example nor in environment`).toBeTruthy();
    if (role === 'worker') expect(env.MODEL_DIR ?? env.MODEL_URI, `${name}: MODEL_DIR or MODEL_URI`).toBeTruthy();
    // The real loader, as the process would run it: fails listing every invalid variable.
    expect(() => loadConfig(env, role)).not.toThrow();
  });

  it('runs the API on the port and health route of the code, listening on all interfaces', () => {
    const api = svc('api');
    const config = loadConfig(effectiveEnv('api'), 'api');
    expect(config.HOST, 'HOST must be 0.0.0.0 in a container').toBe('0.0.0.0');
    expect(config.PORT).toBe(API_PORT);
    expect(publishedPorts(api).map((p) => p.target)).toEqual([config.PORT]);
    expect(api.command ?? null, 'the image CMD (t2i api)').toBeNull();
    expect(healthText(api)).toContain('/healthz');
    expect(healthText(api)).toContain(`process.env.PORT || ${API_PORT}`);
  });

  it.each(WORKERS)('runs %s with its metrics/health port, the model read-only at MODEL_DIR and a writable MODEL_CACHE_DIR', (name) => {
    const s = svc(name);
    const config = loadConfig(effectiveEnv(name), 'worker');
    expect(config.WORKER_METRICS_HOST, 'WORKER_METRICS_HOST must be 0.0.0.0 in a container').toBe('0.0.0.0');
    expect(config.WORKER_METRICS_PORT).toBe(WORKER_PORT);
    expect(healthText(s)).toContain('/healthz');
    expect(healthText(s)).toContain(`process.env.WORKER_METRICS_PORT || ${WORKER_PORT}`);
    // Workers scale (--scale): a fixed published port would collide.
    expect(s.ports ?? []).toEqual([]);
    const model = mounts(s).find((m) => isInside(config.MODEL_DIR!, m.target));
    expect(model, `a volume mounted at or above MODEL_DIR=${config.MODEL_DIR}`).toBeDefined();
    expect(model!.readOnly, 'the model is mounted read-only').toBe(true);
    // MODEL_CACHE_DIR comes from the image (Dockerfile.worker ENV): a named volume every worker shares.
    const cache = mounts(s).find((m) => m.target === '/var/cache/t2i');
    expect(cache).toMatchObject({ source: 'model-cache', readOnly: false });
    expect(Object.keys(compose.volumes ?? {})).toContain('model-cache');
    expect(namesOf(name)).toContain('worker');
  });

  it.each(WORKERS)('lets %s finish its shutdown within stop_grace_period, and uses most of it', (name) => {
    const config = loadConfig(effectiveEnv(name), 'worker');
    const graceMs = durationMs(svc(name).stop_grace_period ?? '10s');
    const budget = shutdownBudgetMs(config);
    // Docker SIGKILLs after stop_grace_period: the worker's whole timeline must fit in it.
    expect(budget, `SHUTDOWN_GRACE_MS ${config.SHUTDOWN_GRACE_MS} + close timeouts = ${budget} ms vs stop_grace_period ${graceMs} ms`).toBeLessThan(graceMs);
    // And a long grace period is not promised while the worker gives up on its job far earlier.
    expect(budget).toBeGreaterThanOrEqual(0.75 * graceMs);
  });

  it('gives the GPU worker one NVIDIA GPU and CUDA, the CPU worker the CPU image', () => {
    const gpu = svc('worker-gpu');
    expect(environmentOf(gpu).EXECUTION_PROVIDER).toBe('cuda');
    expect(gpu.build).toMatchObject({ args: { VARIANT: 'cuda' } });
    expect(gpu.deploy?.resources?.reservations?.devices).toEqual([{ driver: 'nvidia', count: 1, capabilities: ['gpu'] }]);
    for (const w of MODEL_WORKERS) {
      expect(environmentOf(svc(w)).EXECUTION_PROVIDER, w).toBe('cuda');
      expect(svc(w).deploy?.resources?.reservations?.devices, w).toEqual(gpu.deploy?.resources?.reservations?.devices);
      expect(svc(w).image, w).toBe(gpu.image);
    }
    const cpu = svc('worker-cpu');
    expect(environmentOf(cpu).EXECUTION_PROVIDER).toBe('cpu');
    expect(cpu.build).toMatchObject({ args: { VARIANT: 'cpu' } });
    expect(cpu.deploy).toBeUndefined();
  });

  it('orders startup: postgres -> migrate -> api and workers, after redis and the bucket', () => {
    expect(dependsOn(svc('migrate'))).toEqual({ postgres: 'service_healthy' });
    expect(svc('migrate').command).toEqual(['node', 'bin/t2i.js', 'migrate']);
    expect(svc('migrate').restart).toBe('no');
    const afterInit = { migrate: 'service_completed_successfully', redis: 'service_healthy', 'minio-init': 'service_completed_successfully' };
    for (const s of ['api', ...WORKERS]) expect(dependsOn(svc(s)), s).toEqual(afterInit);
    expect(dependsOn(svc('minio-init'))).toEqual({ minio: 'service_healthy' });
    expect(svc('migrate').image, 'migrate runs the API image').toBe(svc('api').image);
  });

  it('serves two models in the two-models profile: a worker each, under distinct names, and API settings from .env.example that name both', () => {
    const configs = MODEL_WORKERS.map((w) => loadConfig(effectiveEnv(w), 'worker'));
    const names = configs.map((c) => c.MODEL_NAME);
    expect(names).toEqual(['sd15', 'sdxl-turbo']);
    // Two exports, each in the read-only models mount.
    expect(new Set(configs.map((c) => c.MODEL_DIR)).size).toBe(2);
    for (const [i, c] of configs.entries())
      expect(
        mounts(svc(MODEL_WORKERS[i]!)).some((m) => isInside(c.MODEL_DIR!, m.target) && m.readOnly),
        c.MODEL_DIR,
      ).toBe(true);
    // What the guide and .env.example tell the operator to set for this profile, as the API reads it.
    const suggested = Object.fromEntries([...read('.env.example').matchAll(/^# (KNOWN_MODELS|DEFAULT_MODEL)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
    const api = loadConfig({ ...effectiveEnv('api'), ...suggested }, 'api');
    expect(api.KNOWN_MODELS).toEqual(names);
    expect(names).toContain(api.DEFAULT_MODEL);
    const guide = read('docs/deployment.md');
    expect(guide).toContain('--profile two-models');
    for (const n of names) expect(guide, `docs/deployment.md names ${n}`).toContain(n);
  });

  it('runs Postgres, Redis and MinIO with volumes and health checks; Redis never evicts', () => {
    expect(svc('postgres').image).toBe('postgres:16');
    expect(healthText(svc('postgres'))).toContain('pg_isready');
    expect(svc('redis').image).toBe('redis:7');
    const redisCmd = asList(svc('redis').command).join(' ');
    expect(redisCmd).toContain('--appendonly yes');
    expect(redisCmd).toContain('--maxmemory-policy noeviction');
    expect(healthText(svc('redis'))).toContain('redis-cli ping');
    for (const s of ['postgres', 'redis', 'minio']) {
      expect(svc(s).healthcheck, s).toBeDefined();
      const named = mounts(svc(s)).filter((m) => Object.keys(compose.volumes ?? {}).includes(m.source));
      expect(named.length, `${s} keeps its data in a named volume`).toBe(1);
    }
    // The bucket is created and kept private.
    const init = [...asList(svc('minio-init').entrypoint), ...asList(svc('minio-init').command)].join(' ');
    expect(init).toContain('mc mb --ignore-existing');
    expect(init).toContain('mc anonymous set none');
  });

  it('takes the Postgres and MinIO accounts from the .env values the services use', () => {
    const raw = (name: string) => environmentOf(composeRaw.services[name]!);
    expect(raw('postgres').T2I_DATABASE_URL).toMatch(/^\$\{DATABASE_URL[:?}]/);
    expect(raw('minio').MINIO_ROOT_USER).toMatch(/^\$\{STORAGE_ACCESS_KEY[:?}]/);
    expect(raw('minio').MINIO_ROOT_PASSWORD).toMatch(/^\$\{STORAGE_SECRET_KEY[:?}]/);
    // The entrypoint's URL parsing, run with sh as the image would.
    const script = asList(svc('postgres').entrypoint)
      .at(-1)!
      .replace('exec docker-entrypoint.sh postgres', 'echo "$POSTGRES_USER|$POSTGRES_PASSWORD|$POSTGRES_DB"');
    const out = execFileSync('sh', ['-c', script], {
      env: { PATH: process.env.PATH, T2I_DATABASE_URL: 'postgresql://alice:pw-1_x@postgres:5432/images?schema=public' },
    })
      .toString()
      .trim();
    expect(out).toBe('alice|pw-1_x|images');
    expect(new URL(ENV_EXAMPLE.DATABASE_URL!).hostname).toBe('postgres');
  });

  it('writes no secret into the file: secret-looking settings are ${...} references', () => {
    for (const [name, s] of Object.entries(composeRaw.services)) {
      for (const [k, v] of Object.entries(environmentOf(s))) {
        if (/PASSWORD|SECRET|ACCESS_KEY|TOKEN|DATABASE_URL|REDIS_URL/.test(k)) expect(v, `${name}.environment.${k}`).toMatch(/^\$\{[A-Z_]+(:?[-?][^}]*)?\}$/);
      }
    }
  });

  it('publishes ports on 127.0.0.1 by default, and never Postgres or Redis', () => {
    for (const [name, s] of Object.entries(services))
      for (const p of publishedPorts(s)) expect(p.hostIp, `${name} publishes ${p.published} on`).toBe('127.0.0.1');
    expect(svc('postgres').ports).toBeUndefined();
    expect(svc('redis').ports).toBeUndefined();
    const pub = new URL(ENV_EXAMPLE.STORAGE_PUBLIC_ENDPOINT!);
    expect(publishedPorts(svc('minio')).map((p) => p.published)).toContain(Number(pub.port));
    expect(new URL(ENV_EXAMPLE.STORAGE_ENDPOINT!).hostname).toBe('minio');
  });

  it('builds from contexts and Dockerfiles that exist', () => {
    const built = Object.entries(services).filter(([, s]) => s.build);
    expect(built.map(([n]) => n).sort()).toEqual(['api', 'migrate', 'worker-cpu', 'worker-gpu', ...MODEL_WORKERS].sort());
    for (const [name, s] of built) {
      const b = typeof s.build === 'string' ? { context: s.build, dockerfile: undefined } : s.build!;
      expect(existsSync(path.resolve(rel(''), b.context)), `${name}: context ${b.context}`).toBe(true);
      expect(existsSync(path.join(path.resolve(rel(''), b.context), b.dockerfile ?? 'Dockerfile')), `${name}: ${b.dockerfile}`).toBe(true);
    }
  });

  it('mounts the Prometheus and Grafana configs from deploy/', () => {
    const prom = mounts(svc('prometheus'));
    expect(prom).toContainEqual({ source: './deploy/prometheus/prometheus.yml', target: '/etc/prometheus/prometheus.yml', readOnly: true });
    expect(prom).toContainEqual({ source: './deploy/prometheus/alerts.yml', target: '/etc/prometheus/alerts.yml', readOnly: true });
    expect(asList(svc('prometheus').command)).toContain('--config.file=/etc/prometheus/prometheus.yml');
    const graf = mounts(svc('grafana'));
    expect(graf).toContainEqual({ source: './deploy/grafana/provisioning', target: '/etc/grafana/provisioning', readOnly: true });
    expect(graf).toContainEqual({ source: './deploy/grafana/dashboards', target: '/var/lib/grafana/dashboards', readOnly: true });
  });
});

// --- Observability configs -----------------------------------------------------------------------

/** host:port targets of static_configs and dns_sd_configs, anywhere in a parsed config. */
function scrapeTargets(v: unknown): string[] {
  if (Array.isArray(v)) return v.flatMap(scrapeTargets);
  if (!v || typeof v !== 'object') return [];
  const o = v as Record<string, unknown>;
  const own: string[] = [];
  if (Array.isArray(o.targets)) own.push(...o.targets.filter((t): t is string => typeof t === 'string'));
  if (Array.isArray(o.names) && o.port !== undefined) own.push(...o.names.map((n) => `${String(n)}:${String(o.port)}`));
  return [...own, ...Object.values(o).flatMap(scrapeTargets)];
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
    const want = m ? expectedPort(m[1]!) : undefined;
    if (want !== undefined) expect(Number(m![2]), `${file}: target ${t}`).toBe(want);
  }
  expect(
    targets.some((t) => t.endsWith(`:${WORKER_PORT}`)),
    `${file} scrapes a worker on :${WORKER_PORT}: ${targets.join(', ')}`,
  ).toBe(true);
}

describe('observability configs', () => {
  it('deploy/prometheus/prometheus.yml scrapes the compose services on the ports of the code', () => {
    const p = 'deploy/prometheus/prometheus.yml';
    const cfg = parseAs(
      z.looseObject({
        rule_files: z.array(z.string()).optional(),
        scrape_configs: z.array(z.looseObject({ job_name: z.string(), metrics_path: z.string().optional() })),
      }),
      yamlDocs(p)[0],
      p,
    );
    const targets = scrapeTargets(cfg.scrape_configs);
    checkTargets(p, targets);
    expect(targets.some((t) => expectedPort(t.split(':')[0]!) === API_PORT)).toBe(true);
    for (const job of cfg.scrape_configs) if (job.metrics_path !== undefined) expect(job.metrics_path, job.job_name).toBe('/metrics');
    const mounted = mounts(svc('prometheus')).map((m) => m.target);
    for (const r of cfg.rule_files ?? []) expect(mounted, `rule file ${r}`).toContain(path.posix.resolve('/etc/prometheus', r));
  });

  it('grafana-agent.yaml scrapes the worker metrics port', () => {
    // The agent runs with -config.expand-env: parse what it sees with every variable unset.
    const docs = parseAllDocuments(interpolate(read('grafana-agent.yaml'), {}, new Set()));
    for (const d of docs) expect(d.errors.map((e) => e.message)).toEqual([]);
    checkTargets('grafana-agent.yaml', scrapeTargets(docs.map((d) => d.toJS() as unknown)));
  });

  it('points Grafana at the compose Prometheus and loads dashboards from a folder compose mounts', () => {
    const ds = parseAs(
      z.object({ datasources: z.array(z.looseObject({ url: z.string() })) }),
      yamlDocs('deploy/grafana/provisioning/datasources/prometheus.yml')[0],
      'datasources',
    );
    expect(ds.datasources.some((d) => new URL(d.url).hostname === 'prometheus' && new URL(d.url).port === '9090')).toBe(true);
    expect(publishedPorts(svc('prometheus')).map((p) => p.target)).toContain(9090);
    const dash = parseAs(
      z.object({ providers: z.array(z.looseObject({ name: z.string(), options: z.looseObject({ path: z.string() }) })) }),
      yamlDocs('deploy/grafana/provisioning/dashboards/t2i.yml')[0],
      'dashboards',
    );
    for (const p of dash.providers) {
      const m = mounts(svc('grafana')).find((x) => isInside(p.options.path, x.target));
      expect(m, `provider ${p.name}: ${p.options.path} is not mounted`).toBeDefined();
      const hostDir = path.join(rel(m!.source), path.posix.relative(m!.target, p.options.path));
      expect(
        readdirSync(hostDir).some((f) => f.endsWith('.json')),
        `${hostDir} holds a dashboard`,
      ).toBe(true);
    }
  });

  it('selects on metric names only, so no comment may say the dashboards or alerts select on job', () => {
    const exprs = [
      ...[...read('deploy/grafana/dashboards/t2i.json').matchAll(/"expr":\s*"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!),
      ...[...read('deploy/prometheus/alerts.yml').matchAll(/expr:\s*\|?\s*([^\n]+(?:\n\s{12,}[^\n]+)*)/g)].map((m) => m[1]!),
    ];
    expect(exprs.length).toBeGreaterThan(20);
    for (const e of exprs) expect(e, 'a selector on job').not.toMatch(/\bjob\s*(=|!=|=~|!~)/);
    for (const f of ['grafana-agent.yaml', 'deploy/prometheus/prometheus.yml', 'deploy/prometheus/alerts.yml', 'docs/operations.md']) {
      expect(read(f), f).not.toMatch(/select(s)? on job=/);
    }
  });
});

// --- Comments and docs that name files --------------------------------------------------------

const SHIPPING_FILES = ['Dockerfile.api', 'Dockerfile.worker', 'docker-compose.yml', '.npmrc', '.dockerignore', '.env.example', 'grafana-agent.yaml'];
function yamlFilesUnder(dir: string): string[] {
  return readdirSync(rel(dir)).flatMap((f) => {
    const p = path.posix.join(dir, f);
    return statSync(rel(p)).isDirectory() ? yamlFilesUnder(p) : /\.ya?ml$/.test(f) ? [p] : [];
  });
}

describe('comments in the shipping files', () => {
  const files = [...SHIPPING_FILES, ...yamlFilesUnder('deploy')];
  it.each(files)('%s names only paths that exist and README sections that exist', (f) => {
    const comments = read(f)
      .split('\n')
      .filter((l) => /^\s*#/.test(l) || / # /.test(l))
      .join('\n');
    const readme = read('README.md');
    for (const m of comments.matchAll(/README "([^"]+)"/g))
      expect(readme, `${f}: README section "${m[1]}"`).toMatch(new RegExp(`^#+ ${m[1]!.replace(/[()]/g, '\\$&')}$`, 'm'));
    // A path ends on a letter, digit, _ or -: a full stop after it ends the sentence.
    for (const m of comments.matchAll(/\b((?:dist\/)?(?:src|tests|scripts|docs|deploy)(?:\/[\w.-]*[\w-])+)/g)) {
      const p = m[1]!.replace(/^dist\//, '').replace(/\.js$/, '.ts');
      expect(existsSync(rel(p)), `${f} names ${m[1]}, which does not exist`).toBe(true);
    }
  });
});
