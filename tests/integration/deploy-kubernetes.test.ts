/**
 * deploy/kubernetes checked without a cluster: the manifests as kustomize builds them (the
 * output `kubectl apply -k` sends, built by tests/support/kustomize.ts, and compared with
 * `kubectl kustomize` where kubectl is installed), every object against the
 * Kubernetes API schemas (the kubernetes-models packages) and KEDA's ScaledObject CRD, then
 * against the code: required variables, ports and probes, the worker's shutdown timeline against
 * terminationGracePeriodSeconds, one worker Deployment and one ScaledObject per model (each
 * serving and scaling on its own model, whose query is run against a migrated database), the
 * API's KNOWN_MODELS, and the optional ReadOnlyMany volume component enabled in a copy of the
 * folder. docs/deployment.md says how to check the built output against a cluster by hand.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { ScaledObject, type IScaledObject } from '@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject';
import { Deployment, type IDeployment } from 'kubernetes-models/apps/v1/Deployment';
import { Job, type IJob } from 'kubernetes-models/batch/v1/Job';
import { ConfigMap, type IConfigMap } from 'kubernetes-models/v1/ConfigMap';
import type { IContainer } from 'kubernetes-models/v1/Container';
import { Namespace, type INamespace } from 'kubernetes-models/v1/Namespace';
import { PersistentVolumeClaim, type IPersistentVolumeClaim } from 'kubernetes-models/v1/PersistentVolumeClaim';
import { Secret, type ISecret } from 'kubernetes-models/v1/Secret';
import { Service, type IService } from 'kubernetes-models/v1/Service';
import { loadConfig, type Role } from '../../src/config.js';
import { shutdownBudgetMs } from '../../src/worker/shutdown.js';
import { API_PORT, dockerfileOf, isInside, ops, parseAs, read, rel, REQUIRED, SHAPE, WORKER_PORT, yamlDocs } from '../support/deploy-files.js';
import { kustomizeBuild as buildKustomization } from '../support/kustomize.js';
import { isolatedConfig } from '../support/system.js';

const K8S = 'deploy/kubernetes';

const kustomizationSchema = z.strictObject({
  apiVersion: z.literal('kustomize.config.k8s.io/v1beta1'),
  kind: z.literal('Kustomization'),
  namespace: z.string(),
  labels: z.array(z.strictObject({ pairs: z.record(z.string(), z.string()), includeSelectors: z.boolean().optional() })).optional(),
  resources: z.array(z.string()),
  components: z.array(z.string()).optional(),
  images: z.array(z.strictObject({ name: z.string(), newName: z.string().optional(), newTag: z.string().optional() })),
});
const kustomization = parseAs(kustomizationSchema, yamlDocs(`${K8S}/kustomization.yaml`)[0], 'kustomization.yaml');

/** What `kubectl apply -k DIR` would send, built here (tests/support/kustomize.ts). */
const kustomizeBuild = (dir: string): unknown[] => buildKustomization(dir);

/** kubectl's own kustomize build of DIR, where kubectl is installed (CI machines need not have it). */
function kubectlKustomize(dir: string): unknown[] {
  try {
    return yamlDocs(`kubectl kustomize ${dir}`, execFileSync('kubectl', ['kustomize', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }));
  } catch (err) {
    throw new Error(`kubectl kustomize ${dir} failed: ${(err as { stderr?: string }).stderr ?? String(err)}`, { cause: err });
  }
}
const HAS_KUBECTL = spawnSync('kubectl', ['version', '--client'], { stdio: 'ignore' }).status === 0;

type K8sObject = INamespace | IConfigMap | ISecret | IService | IDeployment | IJob | IPersistentVolumeClaim | IScaledObject;
const head = z.looseObject({ apiVersion: z.string(), kind: z.string(), metadata: z.looseObject({ name: z.string(), namespace: z.string().optional() }) });

/** Validates a manifest against its API schema and returns it typed. Throws naming the file and the fields that do not fit. */
function model(doc: unknown, file: string): K8sObject {
  const { kind } = parseAs(head, doc, file);
  const models: Record<string, (d: unknown) => { validate(): void; toJSON(): unknown }> = {
    Namespace: (d) => new Namespace(d as INamespace),
    ConfigMap: (d) => new ConfigMap(d as IConfigMap),
    Secret: (d) => new Secret(d as ISecret),
    Service: (d) => new Service(d as IService),
    Deployment: (d) => new Deployment(d as IDeployment),
    Job: (d) => new Job(d as IJob),
    PersistentVolumeClaim: (d) => new PersistentVolumeClaim(d as IPersistentVolumeClaim),
    ScaledObject: (d) => new ScaledObject(d as IScaledObject),
  };
  const make = models[kind];
  if (!make) throw new Error(`${file}: no schema here for kind ${kind}`);
  const m = make(doc);
  try {
    m.validate();
  } catch (err) {
    throw new Error(`${file}: ${kind} does not match the API schema: ${(err as Error).message}`, { cause: err });
  }
  return doc as K8sObject;
}

const built = kustomizeBuild(rel(K8S));
const objects = built.map((doc, i) => model(doc, `object ${i} of the build`));
function named<T extends K8sObject>(kind: T['kind'], name: string, from: K8sObject[] = objects): T {
  const d = from.find((x) => x.kind === kind && x.metadata?.name === name);
  if (!d) throw new Error(`${kind}/${name} is not in ${K8S}`);
  return d as T;
}
const deployment = (name: string) => named<IDeployment>('Deployment', name);
const podSpec = (d: IDeployment | IJob) => d.spec!.template.spec!;
const container = (d: IDeployment | IJob) => podSpec(d).containers[0]!;

/** What a container's process sees: envFrom ConfigMaps and Secrets, then env. */
function k8sEnv(c: IContainer, from: K8sObject[] = objects): Record<string, string> {
  const env: Record<string, string> = {};
  for (const f of c.envFrom ?? []) {
    if (f.configMapRef) Object.assign(env, named<IConfigMap>('ConfigMap', f.configMapRef.name!, from).data);
    if (f.secretRef) {
      const s = named<ISecret>('Secret', f.secretRef.name!, from);
      Object.assign(env, Object.fromEntries(Object.entries(s.data ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64').toString()])), s.stringData);
    }
  }
  for (const e of c.env ?? []) if (e.value !== undefined) env[e.name] = e.value;
  return env;
}
/** A probe's or annotation's port, resolving a named container port. */
function portNumber(c: IContainer, port: number | string | undefined): number {
  if (typeof port === 'number') return port;
  return c.ports?.find((x) => x.name === port)?.containerPort ?? Number(port);
}
/** The worker image's MODEL_CACHE_DIR (Dockerfile.worker ENV), which the manifests do not override. */
const imageCacheDir = /MODEL_CACHE_DIR=(\S+)/.exec(ops(dockerfileOf('Dockerfile.worker').stages.at(-1)!, 'ENV').join(' '))?.[1];

/** The models' folders, and the worker Deployment and ScaledObject each one builds. */
const MODEL_DIRS = readdirSync(rel(`${K8S}/models`));
const workerDeployments = objects.filter((o): o is IDeployment => o.kind === 'Deployment' && o.metadata!.name!.startsWith('t2i-worker-'));
const scaledObjects = objects.filter((o): o is IScaledObject => o.kind === 'ScaledObject');
const WORKERS = workerDeployments.map((d) => d.metadata!.name!);
const apiConfig = loadConfig(k8sEnv(container(deployment('t2i-api'))), 'api');

describe('deploy/kubernetes', () => {
  it('lists every manifest and every model folder in kustomization.yaml, and its optional component exists', () => {
    const files = readdirSync(rel(K8S)).filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml');
    expect(kustomization.resources.filter((r) => !r.startsWith('models/')).sort()).toEqual(files.sort());
    expect(kustomization.resources.filter((r) => r.startsWith('models/')).sort()).toEqual(MODEL_DIRS.map((m) => `models/${m}`).sort());
    expect(kustomization.namespace).toBe('t2i');
    expect(named<INamespace>('Namespace', 't2i')).toBeDefined();
    // Offered in a comment of every model's folder: it must exist, so enabling it is one swap there.
    for (const m of MODEL_DIRS) expect(read(`${K8S}/models/${m}/kustomization.yaml`), m).toContain('#   - ../../components/model-volume');
    expect(existsSync(rel(`${K8S}/components/model-volume/kustomization.yaml`))).toBe(true);
  });

  it('validates every object against the Kubernetes API schemas and KEDA CRD, and the validator can fail', () => {
    const kinds = ['ConfigMap', 'Deployment', 'Job', 'Namespace', 'Secret', 'Service', ...MODEL_DIRS.flatMap(() => ['Deployment', 'ScaledObject'])];
    expect(objects.map((o) => o.kind).sort()).toEqual(kinds.sort());
    const bad = structuredClone(deployment(WORKERS[0]!)) as unknown as { spec: { template: { spec: Record<string, unknown> } } };
    bad.spec.template.spec.terminationGracePeriodSeconds = '120';
    expect(() => model(bad, 'worker-deployment.yaml')).toThrow(/terminationGracePeriodSeconds must be integer/);
    const so = structuredClone(scaledObjects[0]!) as unknown as { spec: { triggers: { metadata: Record<string, unknown> }[] } };
    so.spec.triggers[0]!.metadata.targetQueryValue = 2;
    expect(() => model(so, 'worker-scaledobject.yaml')).toThrow(/targetQueryValue must be string/);
  });

  it('puts every object in the t2i namespace with DNS names and string labels and annotations', () => {
    for (const d of objects) {
      expect(d.metadata?.name).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/);
      if (d.kind !== 'Namespace') expect(d.metadata?.namespace ?? 't2i', `${d.kind}/${d.metadata?.name}`).toBe('t2i');
    }
    for (const cm of objects.filter((o): o is IConfigMap => o.kind === 'ConfigMap'))
      for (const k of Object.keys(cm.data ?? {})) expect(Object.keys(SHAPE), `ConfigMap ${k} is a t2i variable`).toContain(k);
  });

  it('matches each workload selector to its pod labels and no other workload’s, the Service to the API pods, and images to kustomization images', () => {
    const workloads = objects.filter((o): o is IDeployment | IJob => o.kind === 'Deployment' || o.kind === 'Job');
    for (const d of workloads) {
      if (d.kind === 'Deployment') {
        expect(d.spec!.template.metadata?.labels).toMatchObject(d.spec!.selector.matchLabels ?? {});
        // Two models' Deployments must never select each other's pods.
        for (const other of workloads.filter((o) => o !== d)) {
          const selects = Object.entries(d.spec!.selector.matchLabels ?? {}).every(([k, v]) => other.spec!.template.metadata?.labels?.[k] === v);
          expect(selects, `${d.metadata?.name} selects the pods of ${other.metadata?.name}`).toBe(false);
        }
      }
      for (const c of [...(podSpec(d).initContainers ?? []), ...podSpec(d).containers]) {
        expect(
          kustomization.images.map((i) => i.newName),
          `${d.metadata?.name}: image ${c.image}`,
        ).toContain(c.image!.split(':')[0]);
      }
    }
    const svc = named<IService>('Service', 't2i-api');
    expect(deployment('t2i-api').spec!.template.metadata?.labels).toMatchObject(svc.spec!.selector ?? {});
    for (const p of svc.spec!.ports ?? []) expect(portNumber(container(deployment('t2i-api')), p.targetPort)).toBe(API_PORT);
  });

  it('keeps credentials in the Secret, as obvious placeholders, and the rest in the ConfigMap', () => {
    const secret = named<ISecret>('Secret', 't2i-secrets');
    const cm = named<IConfigMap>('ConfigMap', 't2i-config');
    for (const k of ['DATABASE_URL', 'REDIS_URL', 'STORAGE_ACCESS_KEY', 'STORAGE_SECRET_KEY']) {
      expect(secret.stringData?.[k], `${k} is a placeholder in the Secret`).toMatch(/CHANGE-ME/);
      expect(Object.keys(cm.data ?? {})).not.toContain(k);
    }
    expect(secret.data).toBeUndefined();
  });

  const workloads = (): [string, string, Role, string][] => [
    ['Deployment', 't2i-api', 'api', 'api'],
    ...WORKERS.map((w): [string, string, Role, string] => ['Deployment', w, 'worker', 'worker']),
    ['Job', 't2i-migrate', 'any', 'migrate'],
  ];
  it('gives every workload every required variable and a valid configuration', () => {
    expect(WORKERS.length).toBe(MODEL_DIRS.length);
    for (const [kind, name, role, command] of workloads()) {
      const w = named<IDeployment | IJob>(kind as 'Deployment', name);
      const c = container(w);
      expect(c.command, name).toEqual(['node', 'bin/t2i.js', command]);
      const env = k8sEnv(c);
      for (const v of REQUIRED) expect(env[v], `${name}: ${v}`).toBeTruthy();
      expect(() => loadConfig(env, role), name).not.toThrow();
      expect(podSpec(w).securityContext?.runAsNonRoot, name).toBe(true);
      expect(c.resources?.requests, `${name}: resource requests`).toBeDefined();
      expect(c.resources?.limits?.memory, `${name}: memory limit`).toBeDefined();
    }
  });

  it('runs 2 API replicas: ready on /readyz, alive on /healthz, on the port of the code, scraped at /metrics', () => {
    const api = deployment('t2i-api');
    const c = container(api);
    expect(api.spec!.replicas).toBe(2);
    expect(apiConfig.HOST).toBe('0.0.0.0');
    expect(c.ports?.map((p) => p.containerPort)).toEqual([API_PORT]);
    expect(c.readinessProbe?.httpGet?.path).toBe('/readyz');
    expect(c.livenessProbe?.httpGet?.path).toBe('/healthz');
    expect(portNumber(c, c.readinessProbe?.httpGet?.port)).toBe(API_PORT);
    expect(api.spec!.template.metadata?.annotations).toEqual({
      'prometheus.io/scrape': 'true',
      'prometheus.io/port': String(API_PORT),
      'prometheus.io/path': '/metrics',
    });
  });

  it('runs one Deployment per model, each serving its own model (MODEL_NAME, its label, its name) from its own export', () => {
    const configs = workerDeployments.map((w) => loadConfig(k8sEnv(container(w)), 'worker'));
    const names = configs.map((c) => c.MODEL_NAME);
    expect(names.sort()).toEqual([...MODEL_DIRS].sort());
    for (const [i, w] of workerDeployments.entries()) {
      const m = configs[i]!.MODEL_NAME!;
      expect(w.metadata?.name).toBe(`t2i-worker-${m}`);
      expect(w.spec!.selector.matchLabels).toMatchObject({ 't2i.dev/model': m });
      // No placeholder of the base survives.
      expect(JSON.stringify(w), w.metadata?.name).not.toContain('set-by-each-model');
    }
    expect(new Set(configs.map((c) => c.MODEL_URI)).size).toBe(configs.length);
    // The API takes every model's jobs even while it has no worker, and its default is one of them.
    expect([...(apiConfig.KNOWN_MODELS ?? [])].sort()).toEqual([...names].sort());
    expect(names).toContain(apiConfig.DEFAULT_MODEL);
  });

  it('runs workers on one GPU each, the model synced from MODEL_URI into a writable cache volume, scraped on 9191', () => {
    for (const w of workerDeployments) {
      const c = container(w);
      const config = loadConfig(k8sEnv(c), 'worker');
      expect(config).toMatchObject({ EXECUTION_PROVIDER: 'cuda', WORKER_METRICS_HOST: '0.0.0.0', WORKER_METRICS_PORT: WORKER_PORT });
      expect(config.MODEL_URI).toMatch(/^s3:\/\//);
      expect(config.MODEL_DIR).toBeUndefined();
      expect(String(c.resources?.limits?.['nvidia.com/gpu'])).toBe('1');
      // The root filesystem is read-only: the cache must be a volume at the image's MODEL_CACHE_DIR.
      expect(imageCacheDir).toBe('/var/cache/t2i');
      expect(c.securityContext?.readOnlyRootFilesystem).toBe(true);
      const mount = c.volumeMounts?.find((m) => m.mountPath === imageCacheDir);
      expect(mount?.readOnly ?? false).toBe(false);
      expect(podSpec(w).volumes?.find((v) => v.name === mount?.name)?.emptyDir).toBeDefined();
      for (const probe of [c.startupProbe, c.livenessProbe, c.readinessProbe]) {
        expect(probe?.httpGet?.path).toBe('/healthz');
        expect(portNumber(c, probe?.httpGet?.port)).toBe(WORKER_PORT);
      }
      // Sync and load happen before /healthz answers: the startup probe must allow minutes.
      expect((c.startupProbe?.periodSeconds ?? 10) * (c.startupProbe?.failureThreshold ?? 3)).toBeGreaterThanOrEqual(600);
      expect(w.spec!.template.metadata?.annotations).toEqual({
        'prometheus.io/scrape': 'true',
        'prometheus.io/port': String(WORKER_PORT),
        'prometheus.io/path': '/metrics',
      });
    }
  });

  it('lets every worker finish its shutdown within terminationGracePeriodSeconds, and uses most of it', () => {
    for (const w of workerDeployments) {
      const config = loadConfig(k8sEnv(container(w)), 'worker');
      const graceMs = (podSpec(w).terminationGracePeriodSeconds ?? 30) * 1000;
      const budget = shutdownBudgetMs(config);
      expect(budget, `SHUTDOWN_GRACE_MS ${config.SHUTDOWN_GRACE_MS} + close timeouts = ${budget} ms vs ${graceMs} ms`).toBeLessThan(graceMs);
      expect(budget).toBeGreaterThanOrEqual(0.75 * graceMs);
    }
  });

  it('runs `t2i doctor` first, with the worker image, settings, GPU and cache', () => {
    for (const w of workerDeployments) {
      const doctor = podSpec(w).initContainers?.find((c) => c.name === 'doctor');
      const worker = container(w);
      expect(doctor?.command).toEqual(['node', 'bin/t2i.js', 'doctor']);
      expect(doctor?.image).toBe(worker.image);
      expect(doctor?.envFrom).toEqual(worker.envFrom);
      const d = loadConfig(k8sEnv(doctor!), 'worker');
      const c = loadConfig(k8sEnv(worker), 'worker');
      for (const k of ['MODEL_NAME', 'MODEL_URI', 'MODEL_DIR', 'EXECUTION_PROVIDER', 'MODEL_CACHE_DIR'] as const)
        expect(d[k], `${w.metadata?.name}: ${k}`).toEqual(c[k]);
      expect(doctor?.resources?.limits?.['nvidia.com/gpu']).toEqual(worker.resources?.limits?.['nvidia.com/gpu']);
      expect(doctor?.volumeMounts?.map((m) => m.mountPath)).toContain(imageCacheDir);
    }
  });

  it('runs the migrations in a Job from the API image', () => {
    const job = named<IJob>('Job', 't2i-migrate');
    expect(['Never', 'OnFailure']).toContain(podSpec(job).restartPolicy);
    expect(container(job).image).toBe(container(deployment('t2i-api')).image);
  });
});

// --- The ReadOnlyMany volume component -------------------------------------------------------

/**
 * A copy of deploy/kubernetes with the model-volume component enabled in the folder of `m`, as its
 * comment says (the S3 patch out, the component in); removed by the returned function.
 */
function withModelVolume(m: string): { dir: string; remove(): void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 't2i-kustomize-'));
  cpSync(rel(K8S), dir, { recursive: true });
  const file = path.join(dir, 'models', m, 'kustomization.yaml');
  const text = readFileSync(file, 'utf8');
  const swapped = text
    .replace(/^ {2}- path: model-uri\.yaml\n/m, '')
    .replace(/^# components:\n# {3}- \.\.\/\.\.\/components\/model-volume$/m, 'components:\n  - ../../components/model-volume');
  if (swapped === text) throw new Error(`${file}: the component's comment or the S3 patch is not where the swap expects them`);
  writeFileSync(file, swapped);
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

describe('components/model-volume (a model from a ReadOnlyMany volume)', () => {
  it('enabled in a model’s folder, claims a ReadOnlyMany volume of its own and loads MODEL_DIR from it instead of MODEL_URI', () => {
    const m = MODEL_DIRS[0]!;
    const copy = withModelVolume(m);
    try {
      const objs = kustomizeBuild(copy.dir).map((d, i) => model(d, `object ${i} of the build with the component`));
      const pvc = objs.find((o): o is IPersistentVolumeClaim => o.kind === 'PersistentVolumeClaim');
      expect(pvc?.metadata?.name).toBe(`t2i-models-${m}`);
      expect(pvc?.spec?.accessModes).toEqual(['ReadOnlyMany']);
      const patched = named<IDeployment>('Deployment', `t2i-worker-${m}`, objs);
      for (const c of [...(podSpec(patched).initContainers ?? []), ...podSpec(patched).containers]) {
        const config = loadConfig(k8sEnv(c, objs), 'worker');
        expect(config.MODEL_URI, c.name).toBeUndefined();
        expect(config.MODEL_NAME, c.name).toBe(m);
        const mount = c.volumeMounts?.find((v) => isInside(config.MODEL_DIR!, v.mountPath));
        expect(mount?.readOnly, `${c.name}: MODEL_DIR on a read-only mount`).toBe(true);
        expect(podSpec(patched).volumes?.find((v) => v.name === mount?.name)?.persistentVolumeClaim?.claimName).toBe(pvc?.metadata?.name);
      }
      // The other models are untouched.
      for (const other of MODEL_DIRS.filter((x) => x !== m))
        expect(loadConfig(k8sEnv(container(named<IDeployment>('Deployment', `t2i-worker-${other}`, objs)), objs), 'worker').MODEL_URI).toMatch(/^s3:/);
    } finally {
      copy.remove();
    }
  });
});

// --- The build itself --------------------------------------------------------------------------

/** Objects by kind and name, as `kubectl apply` identifies them (the order of a build does not matter to it). */
const byName = (docs: unknown[]) => new Map(docs.map((d) => [`${(d as K8sObject).kind}/${(d as K8sObject).metadata!.name!}`, d]));

describe('the kustomize build these tests read', () => {
  it.skipIf(!HAS_KUBECTL)('is the build of kubectl’s own kustomize, as the folder ships and with the volume component enabled', () => {
    const copy = withModelVolume(MODEL_DIRS[0]!);
    try {
      for (const dir of [rel(K8S), copy.dir]) {
        const ours = byName(kustomizeBuild(dir));
        const theirs = byName(kubectlKustomize(dir));
        expect([...ours.keys()].sort(), dir).toEqual([...theirs.keys()].sort());
        for (const [name, doc] of theirs) expect(ours.get(name), `${name} (${dir})`).toEqual(doc);
      }
    } finally {
      copy.remove();
    }
  });

  it('refuses what it does not implement, rather than building something else', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 't2i-kustomize-'));
    try {
      cpSync(rel(K8S), dir, { recursive: true });
      const file = path.join(dir, 'kustomization.yaml');
      writeFileSync(file, `${readFileSync(file, 'utf8')}namePrefix: prod-\n`);
      expect(() => kustomizeBuild(dir)).toThrow(/namePrefix/);
      writeFileSync(path.join(dir, 'models', MODEL_DIRS[0]!, 'worker.yaml'), 'apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: no-such-worker }\n');
      writeFileSync(file, readFileSync(rel(`${K8S}/kustomization.yaml`), 'utf8'));
      expect(() => kustomizeBuild(dir)).toThrow(/worker\.yaml matches no object/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// --- KEDA --------------------------------------------------------------------------------------

const triggerMeta = z
  .object({ connectionFromEnv: z.string(), query: z.string(), targetQueryValue: z.string(), activationTargetQueryValue: z.string().optional() })
  .loose();

describe('KEDA autoscaling, one ScaledObject per model', () => {
  it("scales each model's Deployment on that model's jobs in flight, read from Postgres with the workers' own DATABASE_URL", () => {
    expect(scaledObjects.map((s) => s.spec.scaleTargetRef.name).sort()).toEqual([...WORKERS].sort());
    for (const so of scaledObjects) {
      const target = deployment(so.spec.scaleTargetRef.name);
      const modelName = loadConfig(k8sEnv(container(target)), 'worker').MODEL_NAME!;
      expect(so.metadata?.name).toBe(target.metadata?.name);
      expect(so.spec.triggers).toHaveLength(1);
      expect(so.spec.triggers[0]!.type).toBe('postgresql');
      const meta = parseAs(triggerMeta, so.spec.triggers[0]!.metadata, `${so.metadata?.name} trigger`);
      // KEDA reads the variable from the container it scales: the same Postgres the workers use.
      expect(meta.connectionFromEnv).toBe('DATABASE_URL');
      const url = k8sEnv(container(target)).DATABASE_URL!;
      expect(url).toMatch(/^postgres(ql)?:\/\//);
      // Prisma's ?schema= is ours alone (src/adapters/db/client.ts): KEDA's client would refuse it,
      // and the query's unqualified table is the default schema's.
      expect(new URL(url).searchParams.has('schema'), 'DATABASE_URL for KEDA has no ?schema=').toBe(false);
      expect(meta.query).toContain(`model = '${modelName}'`);
      expect(Number(meta.targetQueryValue)).toBeGreaterThan(0);
      expect(so.spec.maxReplicaCount ?? 100).toBeGreaterThanOrEqual(so.spec.minReplicaCount ?? 0);
      expect(so.spec.cooldownPeriod ?? 300).toBeGreaterThan(so.spec.pollingInterval ?? 30);
      // A model scaled to zero must still have its jobs taken (and held) by the API.
      if ((so.spec.minReplicaCount ?? 0) === 0) expect(apiConfig.KNOWN_MODELS, `${modelName} scales to zero`).toContain(modelName);
    }
    expect(scaledObjects.some((so) => so.spec.minReplicaCount === 0)).toBe(true);
  });

  it("each query counts exactly its model's queued and running jobs, in a migrated database", async () => {
    const config = await isolatedConfig();
    const db = new pg.Client({ connectionString: config.DATABASE_URL });
    await db.connect();
    try {
      const tenant = (await db.query<{ id: string }>(`INSERT INTO tenants (name) VALUES ('keda') RETURNING id`)).rows[0]!.id;
      const names = scaledObjects.map((so) => loadConfig(k8sEnv(container(deployment(so.spec.scaleTargetRef.name))), 'worker').MODEL_NAME!);
      // Per model i: i + 1 queued, 1 running, 2 finished; and jobs of a model no ScaledObject serves.
      const insert = (model: string, status: string) =>
        db.query(
          `INSERT INTO generated_images (tenant_id, model, status, prompt, num_steps, guidance_scale, seed, width, height, scheduler, pixel_steps) VALUES ($1, $2, $3, 'p', 1, 1, 1, 64, 64, 'euler', 4096)`,
          [tenant, model, status],
        );
      for (const [i, n] of names.entries()) {
        for (let k = 0; k <= i; k++) await insert(n, 'queued');
        await insert(n, 'running');
        await insert(n, 'succeeded');
        await insert(n, 'failed');
      }
      await insert('another-model', 'queued');
      for (const [i, so] of scaledObjects.entries()) {
        const { query } = parseAs(triggerMeta, so.spec.triggers[0]!.metadata, 'trigger');
        const { rows } = await db.query<Record<string, string>>(query);
        expect(Object.values(rows[0]!).map(Number), `${names[i]}: ${query}`).toEqual([i + 2]);
      }
    } finally {
      await db.end();
    }
  });
});
