/**
 * `kustomize build` for the part of kustomize that deploy/kubernetes uses, so the deploy tests
 * see the objects `kubectl apply -k deploy/kubernetes` would send without needing kubectl (a CI
 * machine has none). Every field outside that part is an error, never ignored, so this build
 * cannot silently differ from kustomize's; where kubectl is installed, deploy-kubernetes.test.ts
 * also compares it with `kubectl kustomize`.
 *
 * What it does, in kustomize's order (api/internal/target/kusttarget.go): a folder's resources
 * (files, and folders built first, each with its own kustomization), then its components (their
 * resources added, their patches applied to everything so far), then its own transformers:
 * patches (strategic merge from a file, or RFC 6902 operations on a target), namespace, name
 * suffix, labels, images. A renamed object's references are renamed within the folder that renamed
 * it (kustomize matches references by the prefixes and suffixes both sides went through, which
 * here comes to the same): ConfigMaps, Secrets and PersistentVolumeClaims in pod specs, and the
 * folder's `configurations` nameReference fields (a ScaledObject's Deployment).
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { z } from 'zod';

export type KObject = Record<string, unknown> & {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
};

const target = z.strictObject({ kind: z.string().optional(), name: z.string().optional() });
const patchEntry = z.union([z.strictObject({ path: z.string() }), z.strictObject({ target, patch: z.string() })]);
const kustomizationFile = z.strictObject({
  apiVersion: z.enum(['kustomize.config.k8s.io/v1beta1', 'kustomize.config.k8s.io/v1alpha1']),
  kind: z.enum(['Kustomization', 'Component']),
  namespace: z.string().optional(),
  nameSuffix: z.string().optional(),
  labels: z.array(z.strictObject({ pairs: z.record(z.string(), z.string()), includeSelectors: z.boolean().optional() })).optional(),
  resources: z.array(z.string()).optional(),
  components: z.array(z.string()).optional(),
  patches: z.array(patchEntry).optional(),
  configurations: z.array(z.string()).optional(),
  images: z.array(z.strictObject({ name: z.string(), newName: z.string().optional(), newTag: z.string().optional() })).optional(),
});

const nameReferenceConfig = z.strictObject({
  nameReference: z.array(
    z.strictObject({
      kind: z.string(),
      fieldSpecs: z.array(z.strictObject({ kind: z.string(), path: z.string() })),
    }),
  ),
});

/** A reference from one object's field to another object's name. */
interface NameReference {
  /** The kind referred to. */
  kind: string;
  /** The kind holding the reference, and the path to it (arrays are walked through). */
  from: string;
  path: string[];
}

const POD_SPEC_OWNERS = ['Deployment', 'Job'];
const CONTAINER_LISTS = ['containers', 'initContainers'];
/** kustomize's built-in name references (api/konfig/builtinpluginconsts/namereference.go) for what these manifests hold. */
const BUILTIN_REFERENCES: NameReference[] = POD_SPEC_OWNERS.flatMap((from) => {
  const pod = ['spec', 'template', 'spec'];
  return [
    { kind: 'PersistentVolumeClaim', from, path: [...pod, 'volumes', 'persistentVolumeClaim', 'claimName'] },
    { kind: 'ConfigMap', from, path: [...pod, 'volumes', 'configMap', 'name'] },
    { kind: 'Secret', from, path: [...pod, 'volumes', 'secret', 'secretName'] },
    ...CONTAINER_LISTS.flatMap((list) => [
      { kind: 'ConfigMap', from, path: [...pod, list, 'envFrom', 'configMapRef', 'name'] },
      { kind: 'ConfigMap', from, path: [...pod, list, 'env', 'valueFrom', 'configMapKeyRef', 'name'] },
      { kind: 'Secret', from, path: [...pod, list, 'envFrom', 'secretRef', 'name'] },
      { kind: 'Secret', from, path: [...pod, list, 'env', 'valueFrom', 'secretKeyRef', 'name'] },
    ]),
  ];
});

/** Builds the kustomization in `dir` (absolute) and returns its objects. Throws naming the file of anything it cannot build. */
export function kustomizeBuild(dir: string): KObject[] {
  return build(dir, 'Kustomization').objects;
}

interface Built {
  objects: KObject[];
  references: NameReference[];
}

function build(dir: string, kind: 'Kustomization' | 'Component', objects: KObject[] = [], inherited: NameReference[] = []): Built {
  const file = ['kustomization.yaml', 'kustomization.yml'].map((f) => path.join(dir, f)).find((f) => existsSync(f));
  if (!file) throw new Error(`${dir}: no kustomization.yaml`);
  const k = parse(kustomizationFile, docsOf(file)[0], file);
  if (k.kind !== kind) throw new Error(`${file}: is a ${k.kind} where a ${kind} is expected`);
  if (kind === 'Component' && (k.namespace || k.nameSuffix || k.labels || k.images || k.components))
    throw new Error(`${file}: this build supports only resources and patches in a component`);

  const references = [...inherited, ...(k.configurations ?? []).flatMap((c) => nameReferencesOf(path.join(dir, c)))];
  // A kustomization's own objects start empty; a component extends those of the folder using it.
  let all = [...objects];
  for (const r of k.resources ?? []) {
    const p = path.join(dir, r);
    if (statSync(p, { throwIfNoEntry: false })?.isDirectory()) {
      const sub = build(p, 'Kustomization');
      all.push(...sub.objects);
      references.push(...sub.references);
    } else {
      all.push(...docsOf(p).map((d) => asObject(d, p)));
    }
  }
  for (const c of k.components ?? []) all = build(path.join(dir, c), 'Component', all, references).objects;
  // kustomize refuses a patch file whose object is not there.
  for (const p of k.patches ?? []) {
    if ('path' in p && !all.some((o) => matches(o, patchTarget(p, dir)))) throw new Error(`${file}: patch ${p.path} matches no object`);
  }
  const renamed = new Map<string, string>();
  all = all.map((o) => {
    let out = o;
    for (const [i, p] of (k.patches ?? []).entries()) out = applyPatch(out, p, dir, `${file} patches[${i}]`);
    if (k.namespace && out.kind !== 'Namespace') out = { ...out, metadata: { ...out.metadata, namespace: k.namespace } };
    if (k.nameSuffix && out.kind !== 'Namespace') {
      renamed.set(`${out.kind}/${out.metadata.name}`, out.metadata.name + k.nameSuffix);
      out = { ...out, metadata: { ...out.metadata, name: out.metadata.name + k.nameSuffix } };
    }
    for (const l of k.labels ?? []) out = addLabels(out, l.pairs, l.includeSelectors ?? false);
    for (const image of k.images ?? []) out = setImage(out, image);
    return out;
  });
  // References to what this folder renamed.
  if (renamed.size > 0) all = all.map((o) => renameReferences(o, renamed, references));
  return { objects: all, references };
}

function docsOf(file: string): unknown[] {
  const docs = parseAllDocuments(readFileSync(file, 'utf8'));
  const list = Array.isArray(docs) ? docs : [docs];
  const errors = list.flatMap((d) => d.errors.map((e) => e.message));
  if (errors.length > 0) throw new Error(`YAML errors in ${file}: ${errors.join('; ')}`);
  return list.map((d) => d.toJS() as unknown).filter((d) => d != null);
}

function parse<T>(schema: z.ZodType<T>, value: unknown, file: string): T {
  const r = schema.safeParse(value);
  if (!r.success)
    throw new Error(`${file}: not in the kustomize subset this build supports: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

const objectHead = z.looseObject({ apiVersion: z.string(), kind: z.string(), metadata: z.looseObject({ name: z.string() }) });
function asObject(doc: unknown, file: string): KObject {
  parse(objectHead, doc, file);
  return doc as KObject;
}

function nameReferencesOf(file: string): NameReference[] {
  return parse(nameReferenceConfig, docsOf(file)[0], file).nameReference.flatMap((r) =>
    r.fieldSpecs.map((f) => ({ kind: r.kind, from: f.kind, path: f.path.split('/') })),
  );
}

// --- Patches -----------------------------------------------------------------------------------

function patchTarget(p: z.infer<typeof patchEntry>, dir: string): { kind?: string | undefined; name?: string | undefined } {
  if ('target' in p) return p.target;
  const doc = asObject(docsOf(path.join(dir, p.path))[0], p.path);
  return { kind: doc.kind, name: doc.metadata.name };
}

function matches(o: KObject, t: { kind?: string | undefined; name?: string | undefined }): boolean {
  return (t.kind === undefined || o.kind === t.kind) && (t.name === undefined || o.metadata.name === t.name);
}

function applyPatch(o: KObject, p: z.infer<typeof patchEntry>, dir: string, where: string): KObject {
  if ('path' in p) {
    const patch = asObject(docsOf(path.join(dir, p.path))[0], p.path);
    if (!matches(o, { kind: patch.kind, name: patch.metadata.name })) return o;
    return strategicMerge(o, patch, []) as KObject;
  }
  if (!matches(o, p.target)) return o;
  const ops = parse(
    z.array(z.strictObject({ op: z.enum(['add', 'replace', 'remove']), path: z.string(), value: z.unknown().optional() })),
    docsOf0(p.patch, where),
    where,
  );
  let out: unknown = structuredClone(o);
  for (const op of ops) out = jsonPatch(out, op, where);
  return out as KObject;
}

function docsOf0(text: string, where: string): unknown {
  const docs = parseAllDocuments(text);
  const first = Array.isArray(docs) ? docs[0] : docs;
  if (!first || first.errors.length > 0) throw new Error(`${where}: the patch is not YAML`);
  return first.toJS() as unknown;
}

/** RFC 6902 add, replace and remove on a JSON pointer. */
function jsonPatch(doc: unknown, op: { op: 'add' | 'replace' | 'remove'; path: string; value?: unknown }, where: string): unknown {
  const keys = op.path
    .split('/')
    .slice(1)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
  const last = keys.pop();
  if (last === undefined) throw new Error(`${where}: the path ${op.path} names the whole object`);
  let parent: unknown = doc;
  for (const key of keys) {
    parent = (parent as Record<string, unknown>)?.[key];
    if (parent === undefined || parent === null || typeof parent !== 'object') throw new Error(`${where}: ${op.path} does not exist`);
  }
  if (Array.isArray(parent)) {
    const i = last === '-' ? parent.length : Number(last);
    if (!Number.isInteger(i) || i < 0 || i > parent.length || (op.op !== 'add' && i >= parent.length)) throw new Error(`${where}: ${op.path} is out of range`);
    if (op.op === 'add') parent.splice(i, 0, op.value);
    else if (op.op === 'replace') parent[i] = op.value;
    else parent.splice(i, 1);
    return doc;
  }
  const obj = parent as Record<string, unknown>;
  if (op.op !== 'add' && !(last in obj)) throw new Error(`${where}: ${op.path} does not exist`);
  if (op.op === 'remove') delete obj[last];
  else obj[last] = op.value;
  return doc;
}

/**
 * The merge keys of the lists these manifests patch, from the Kubernetes API's patchMergeKey
 * (what kustomize's strategic merge reads from the OpenAPI schema); any other list is replaced.
 */
const MERGE_KEYS: Record<string, string> = {
  containers: 'name',
  initContainers: 'name',
  env: 'name',
  volumes: 'name',
  volumeMounts: 'mountPath',
  ports: 'containerPort',
};

/** Strategic merge: maps merge, lists with a merge key merge item by item (`$patch: delete` removes one), others are replaced. */
function strategicMerge(base: unknown, patch: unknown, at: string[]): unknown {
  if (Array.isArray(patch)) {
    const key = MERGE_KEYS[at.at(-1) ?? ''];
    if (!key || !Array.isArray(base)) return patch.filter((p) => !(isMap(p) && p.$patch === 'delete'));
    // kustomize (kyaml's merge) puts the patch's items first, in its order, then the rest of the base.
    const items = patch as Record<string, unknown>[];
    const inPatch = new Set(items.map((p) => p[key]));
    const out: unknown[] = [];
    for (const item of items) {
      if (item.$patch === 'delete') continue;
      const b = (base as Record<string, unknown>[]).find((x) => x[key] === item[key]);
      out.push(b ? strategicMerge(b, item, at) : item);
    }
    out.push(...(base as Record<string, unknown>[]).filter((b) => !inPatch.has(b[key])));
    return out;
  }
  if (isMap(patch) && isMap(base)) {
    const out: Record<string, unknown> = { ...base };
    for (const [k, v] of Object.entries(patch)) {
      if (k.startsWith('$')) throw new Error(`strategic merge directive ${k} at ${at.join('.')} is not supported here`);
      if (v === null) delete out[k];
      else out[k] = k in out ? strategicMerge(out[k], v, [...at, k]) : v;
    }
    return out;
  }
  return patch;
}

function isMap(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

// --- Labels, images, references ----------------------------------------------------------------

/** kustomize's label field specs (api/konfig/builtinpluginconsts/commonlabels.go) for the kinds here. */
function addLabels(o: KObject, pairs: Record<string, string>, includeSelectors: boolean): KObject {
  const out = structuredClone(o);
  const set = (obj: Record<string, unknown>, keys: string[], create: boolean) => {
    let cur = obj;
    for (const k of keys.slice(0, -1)) {
      if (!isMap(cur[k])) {
        if (!create) return;
        cur[k] = {};
      }
      cur = cur[k] as Record<string, unknown>;
    }
    const last = keys.at(-1)!;
    if (!isMap(cur[last]) && !create) return;
    cur[last] = { ...(cur[last] as Record<string, string> | undefined), ...pairs };
  };
  set(out, ['metadata', 'labels'], true);
  if (includeSelectors) {
    if (out.kind === 'Service') set(out, ['spec', 'selector'], true);
    if (out.kind === 'Deployment') {
      set(out, ['spec', 'selector', 'matchLabels'], true);
      set(out, ['spec', 'template', 'metadata', 'labels'], true);
    }
    if (out.kind === 'Job') {
      set(out, ['spec', 'selector', 'matchLabels'], false);
      set(out, ['spec', 'template', 'metadata', 'labels'], true);
    }
    if (!['Service', 'Deployment', 'Job', 'ScaledObject', 'PersistentVolumeClaim', 'ConfigMap', 'Secret', 'Namespace'].includes(out.kind))
      throw new Error(`labels with includeSelectors on a ${out.kind}: this build does not know its selector fields`);
  }
  return out;
}

function setImage(o: KObject, image: { name: string; newName?: string | undefined; newTag?: string | undefined }): KObject {
  if (!POD_SPEC_OWNERS.includes(o.kind)) return o;
  const out = structuredClone(o);
  const pod = (out.spec as { template: { spec: Record<string, Array<{ image?: string }> | undefined> } }).template.spec;
  for (const list of CONTAINER_LISTS)
    for (const c of pod[list] ?? []) {
      const m = /^([^@:]+(?::\d+\/[^@:]+)?)(?::([^@]+))?(@.+)?$/.exec(c.image ?? '');
      if (!m || m[1] !== image.name) continue;
      if (m[3]) throw new Error(`${o.kind}/${o.metadata.name}: image digests are not supported here`);
      c.image = `${image.newName ?? m[1]}${image.newTag ? `:${image.newTag}` : m[2] ? `:${m[2]}` : ''}`;
    }
  return out;
}

function renameReferences(o: KObject, renamed: Map<string, string>, references: NameReference[]): KObject {
  const out = structuredClone(o);
  for (const ref of [...BUILTIN_REFERENCES, ...references].filter((r) => r.from === o.kind)) {
    const walk = (node: unknown, keys: string[]): void => {
      if (Array.isArray(node)) return node.forEach((n) => walk(n, keys));
      if (!isMap(node)) return;
      const [k, ...rest] = keys;
      if (k === undefined) return;
      if (rest.length === 0) {
        const to = typeof node[k] === 'string' ? renamed.get(`${ref.kind}/${node[k]}`) : undefined;
        if (to) node[k] = to;
        return;
      }
      walk(node[k], rest);
    };
    walk(out, ref.path);
  }
  return out;
}
