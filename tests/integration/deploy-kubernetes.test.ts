/**
 * deploy/kubernetes checked without a cluster: every object against the Kubernetes API schemas
 * (the kubernetes-models packages) and KEDA's ScaledObject CRD, then against the code: required
 * variables, ports and probes, the worker's shutdown timeline against terminationGracePeriodSeconds,
 * the queue metric KEDA scales on, and the optional ReadOnlyMany volume component applied as
 * kustomize would apply its patch. `kubectl kustomize` itself cannot run here; docs/deployment.md
 * says how to check the built output against a cluster by hand.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
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
import { QUEUE_STATES } from '../../src/worker/metrics.js';
import { shutdownBudgetMs } from '../../src/worker/shutdown.js';
import { API_PORT, dockerfileOf, isInside, ops, parseAs, read, rel, REQUIRED, SHAPE, WORKER_PORT, yamlDocs } from '../support/deploy-files.js';

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

const k8s = kustomization.resources.flatMap((r) => yamlDocs(`${K8S}/${r}`).map((d) => ({ file: r, doc: d })));
const objects = k8s.map(({ file, doc }) => model(doc, file));
function named<T extends K8sObject>(kind: T['kind'], name: string): T {
  const d = objects.find((x) => x.kind === kind && x.metadata?.name === name);
  if (!d) throw new Error(`${kind}/${name} is not in ${K8S}`);
  return d as T;
}
const deployment = (name: string) => named<IDeployment>('Deployment', name);
const podSpec = (d: IDeployment | IJob) => d.spec!.template.spec!;
const container = (d: IDeployment | IJob) => podSpec(d).containers[0]!;

/** What a container's process sees: envFrom ConfigMaps and Secrets, then env. */
function k8sEnv(c: IContainer): Record<string, string> {
  const env: Record<string, string> = {};
  for (const from of c.envFrom ?? []) {
    if (from.configMapRef) Object.assign(env, named<IConfigMap>('ConfigMap', from.configMapRef.name!).data);
    if (from.secretRef) {
      const s = named<ISecret>('Secret', from.secretRef.name!);
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

describe('deploy/kubernetes', () => {
  it('lists every manifest of the folder in kustomization.yaml, and its optional component exists', () => {
    const files = readdirSync(rel(K8S)).filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml');
    expect([...kustomization.resources].sort()).toEqual(files.sort());
    expect(kustomization.namespace).toBe('t2i');
    expect(named<INamespace>('Namespace', 't2i')).toBeDefined();
    // Offered in a comment: it must exist, so enabling it is one uncommented line.
    expect(read(`${K8S}/kustomization.yaml`)).toContain('#   - components/model-volume');
    expect(existsSync(rel(`${K8S}/components/model-volume/kustomization.yaml`))).toBe(true);
  });

  it('validates every object against the Kubernetes API schemas and KEDA CRD, and the validator can fail', () => {
    expect(objects.map((o) => o.kind).sort()).toEqual(['ConfigMap', 'Deployment', 'Deployment', 'Job', 'Namespace', 'ScaledObject', 'Secret', 'Service']);
    const bad = structuredClone(deployment('t2i-worker')) as unknown as { spec: { template: { spec: Record<string, unknown> } } };
    bad.spec.template.spec.terminationGracePeriodSeconds = '120';
    expect(() => model(bad, 'worker-deployment.yaml')).toThrow(/terminationGracePeriodSeconds must be integer/);
    const so = structuredClone(named<IScaledObject>('ScaledObject', 't2i-worker')) as unknown as {
      spec: { triggers: { metadata: Record<string, unknown> }[] };
    };
    so.spec.triggers[0]!.metadata.threshold = 2;
    expect(() => model(so, 'worker-scaledobject.yaml')).toThrow(/threshold must be string/);
  });

  it('puts every object in the t2i namespace with DNS names and string labels and annotations', () => {
    for (const d of objects) {
      expect(d.metadata?.name).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/);
      if (d.kind !== 'Namespace') expect(d.metadata?.namespace ?? 't2i', `${d.kind}/${d.metadata?.name}`).toBe('t2i');
    }
    for (const cm of objects.filter((o): o is IConfigMap => o.kind === 'ConfigMap'))
      for (const k of Object.keys(cm.data ?? {})) expect(Object.keys(SHAPE), `ConfigMap ${k} is a t2i variable`).toContain(k);
  });

  it('matches each workload selector to its pod labels, the Service to the API pods, and images to kustomization images', () => {
    for (const d of objects.filter((o): o is IDeployment | IJob => o.kind === 'Deployment' || o.kind === 'Job')) {
      if (d.kind === 'Deployment') expect(d.spec!.template.metadata?.labels).toMatchObject(d.spec!.selector.matchLabels ?? {});
      for (const c of [...(podSpec(d).initContainers ?? []), ...podSpec(d).containers]) {
        expect(
          kustomization.images.map((i) => i.name),
          `${d.metadata?.name}: image ${c.image}`,
        ).toContain(c.image);
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

  const workloads: [string, string, Role, string][] = [
    ['Deployment', 't2i-api', 'api', 'api'],
    ['Deployment', 't2i-worker', 'worker', 'worker'],
    ['Job', 't2i-migrate', 'any', 'migrate'],
  ];
  it.each(workloads)('gives %s/%s every required variable and a valid configuration', (kind, name, role, command) => {
    const w = named<IDeployment | IJob>(kind as 'Deployment', name);
    const c = container(w);
    expect(c.command).toEqual(['node', 'bin/t2i.js', command]);
    const env = k8sEnv(c);
    for (const v of REQUIRED) expect(env[v], `${name}: ${v}`).toBeTruthy();
    expect(() => loadConfig(env, role)).not.toThrow();
    expect(podSpec(w).securityContext?.runAsNonRoot).toBe(true);
    expect(c.resources?.requests, `${name}: resource requests`).toBeDefined();
    expect(c.resources?.limits?.memory, `${name}: memory limit`).toBeDefined();
  });

  it('runs 2 API replicas: ready on /readyz, alive on /healthz, on the port of the code, scraped at /metrics', () => {
    const api = deployment('t2i-api');
    const c = container(api);
    const config = loadConfig(k8sEnv(c), 'api');
    expect(api.spec!.replicas).toBe(2);
    expect(config.HOST).toBe('0.0.0.0');
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

  it('runs workers on one GPU each, the model synced from MODEL_URI into a writable cache volume, scraped on 9191', () => {
    const w = deployment('t2i-worker');
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
  });

  it('lets the worker finish its shutdown within terminationGracePeriodSeconds, and uses most of it', () => {
    const w = deployment('t2i-worker');
    const config = loadConfig(k8sEnv(container(w)), 'worker');
    const graceMs = (podSpec(w).terminationGracePeriodSeconds ?? 30) * 1000;
    const budget = shutdownBudgetMs(config);
    expect(budget, `SHUTDOWN_GRACE_MS ${config.SHUTDOWN_GRACE_MS} + close timeouts = ${budget} ms vs ${graceMs} ms`).toBeLessThan(graceMs);
    expect(budget).toBeGreaterThanOrEqual(0.75 * graceMs);
  });

  it('runs `t2i doctor` first, with the worker image, settings, GPU and cache', () => {
    const w = deployment('t2i-worker');
    const doctor = podSpec(w).initContainers?.find((c) => c.name === 'doctor');
    const worker = container(w);
    expect(doctor?.command).toEqual(['node', 'bin/t2i.js', 'doctor']);
    expect(doctor?.image).toBe(worker.image);
    expect(doctor?.envFrom).toEqual(worker.envFrom);
    const d = loadConfig(k8sEnv(doctor!), 'worker');
    const c = loadConfig(k8sEnv(worker), 'worker');
    for (const k of ['MODEL_URI', 'MODEL_DIR', 'EXECUTION_PROVIDER', 'MODEL_CACHE_DIR'] as const) expect(d[k], k).toEqual(c[k]);
    expect(doctor?.resources?.limits?.['nvidia.com/gpu']).toEqual(worker.resources?.limits?.['nvidia.com/gpu']);
    expect(doctor?.volumeMounts?.map((m) => m.mountPath)).toContain(imageCacheDir);
  });

  it('runs the migrations in a Job from the API image', () => {
    const job = named<IJob>('Job', 't2i-migrate');
    expect(['Never', 'OnFailure']).toContain(podSpec(job).restartPolicy);
    expect(container(job).image).toBe(container(deployment('t2i-api')).image);
  });
});

// --- The ReadOnlyMany volume component -------------------------------------------------------

/** Kustomize's strategic merge for what the patch uses: objects merge, lists of named objects merge by name ($patch: delete removes). */
function strategicMerge(target: unknown, patch: unknown): unknown {
  if (Array.isArray(patch) && Array.isArray(target) && patch.every((p) => p && typeof p === 'object' && 'name' in p)) {
    const out = [...(target as { name: string }[])];
    for (const p of patch as { name: string; $patch?: string }[]) {
      const i = out.findIndex((t) => t.name === p.name);
      if (p.$patch === 'delete') {
        if (i >= 0) out.splice(i, 1);
      } else if (i >= 0) out[i] = strategicMerge(out[i], p) as { name: string };
      else out.push(p);
    }
    return out;
  }
  if (patch && typeof patch === 'object' && !Array.isArray(patch) && target && typeof target === 'object' && !Array.isArray(target)) {
    const out: Record<string, unknown> = { ...(target as Record<string, unknown>) };
    for (const [k, v] of Object.entries(patch)) out[k] = k in out ? strategicMerge(out[k], v) : v;
    return out;
  }
  return patch;
}

describe('components/model-volume (the model from a ReadOnlyMany volume)', () => {
  const dir = `${K8S}/components/model-volume`;
  const component = parseAs(
    z.strictObject({
      apiVersion: z.literal('kustomize.config.k8s.io/v1alpha1'),
      kind: z.literal('Component'),
      resources: z.array(z.string()),
      patches: z.array(z.strictObject({ path: z.string() })),
    }),
    yamlDocs(`${dir}/kustomization.yaml`)[0],
    'model-volume component',
  );

  it('claims a ReadOnlyMany volume and patches the worker to load MODEL_DIR from it instead of MODEL_URI', () => {
    const pvc = model(yamlDocs(`${dir}/${component.resources[0]!}`)[0], 'model-pvc.yaml') as IPersistentVolumeClaim;
    expect(pvc.spec?.accessModes).toEqual(['ReadOnlyMany']);
    const patch = yamlDocs(`${dir}/${component.patches[0]!.path}`)[0];
    expect(parseAs(head, patch, 'patch')).toMatchObject({ kind: 'Deployment', metadata: { name: 't2i-worker' } });
    const patched = model(strategicMerge(deployment('t2i-worker'), patch), 'patched worker') as IDeployment;
    for (const c of [...(podSpec(patched).initContainers ?? []), ...podSpec(patched).containers]) {
      const config = loadConfig(k8sEnv(c), 'worker');
      expect(config.MODEL_URI, c.name).toBeUndefined();
      const mount = c.volumeMounts?.find((m) => isInside(config.MODEL_DIR!, m.mountPath));
      expect(mount?.readOnly, `${c.name}: MODEL_DIR on a read-only mount`).toBe(true);
      expect(podSpec(patched).volumes?.find((v) => v.name === mount?.name)?.persistentVolumeClaim?.claimName).toBe(pvc.metadata?.name);
    }
  });
});

// --- KEDA --------------------------------------------------------------------------------------

describe('KEDA autoscaling', () => {
  const so = named<IScaledObject>('ScaledObject', 't2i-worker');
  const trigger = so.spec.triggers[0]!;
  const meta = parseAs(z.object({ serverAddress: z.string(), query: z.string(), threshold: z.string() }).loose(), trigger.metadata, 'trigger metadata');

  it('scales the worker Deployment on the queue-depth metric the workers export', () => {
    expect(so.spec.scaleTargetRef.name).toBe('t2i-worker');
    expect(so.spec.triggers).toHaveLength(1);
    expect(trigger.type).toBe('prometheus');
    expect(Number(meta.threshold)).toBeGreaterThan(0);
    const m = /^max\(([a-zA-Z_:][a-zA-Z0-9_:]*)\{state="(\w+)"\}\)$/.exec(meta.query);
    expect(m, meta.query).not.toBeNull();
    expect(m![1]).toBe('t2i_queue_jobs');
    expect(QUEUE_STATES).toContain(m![2]);
    const exporters = sourceFilesDefining(`'${m![1]}'`);
    expect(exporters).toEqual([path.join('src', 'worker', 'metrics.ts')]);
    // Only workers export the gauge: with none running the query is empty and KEDA would never
    // scale up again, so the minimum must keep one.
    expect(so.spec.minReplicaCount ?? 0).toBeGreaterThanOrEqual(1);
    expect(so.spec.maxReplicaCount ?? 100).toBeGreaterThanOrEqual(so.spec.minReplicaCount ?? 0);
    expect(so.spec.cooldownPeriod ?? 300).toBeGreaterThan(so.spec.pollingInterval ?? 30);
  });

  it('asks the Prometheus of the chart the deployment guide installs, and marks the address site-specific', () => {
    const helm = /helm install (\S+) prometheus-community\/prometheus --namespace (\S+)/.exec(read('docs/deployment.md'));
    expect(helm, 'docs/deployment.md installs the prometheus-community chart').not.toBeNull();
    const [, release, namespace] = helm!;
    // The chart names its server Service <release>-server (the release name already contains the
    // chart name) and serves it on port 80.
    const url = new URL(meta.serverAddress);
    expect(url.hostname).toBe(`${release!}-server.${namespace!}.svc.cluster.local`);
    expect(url.port || '80').toBe('80');
    const lines = read(`${K8S}/worker-scaledobject.yaml`).split('\n');
    const at = lines.findIndex((l) => l.includes('serverAddress:'));
    expect(lines.slice(Math.max(0, at - 4), at).join('\n')).toContain('SITE-SPECIFIC');
  });
});

function sourceFilesDefining(text: string, dir = 'src'): string[] {
  return readdirSync(rel(dir), { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return e.name === 'generated' ? [] : sourceFilesDefining(text, p);
    return p.endsWith('.ts') && readFileSync(rel(p), 'utf8').includes(text) ? [p] : [];
  });
}
