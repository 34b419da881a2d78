/**
 * Reading the shipping files for the deploy-config tests: YAML parsed the way Compose and
 * Kubernetes parse it, typed through zod schemas of the fields the tests read (the full check is
 * the Compose Specification's JSON schema and the Kubernetes models), Compose's variable
 * interpolation, and a small Dockerfile and .dockerignore reader.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ErrorObject } from 'ajv';
import { parseAllDocuments } from 'yaml';
import { z } from 'zod';
import { envSchema } from '../../src/config.js';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const rel = (p: string) => path.join(ROOT, p);
export const read = (p: string) => readFileSync(rel(p), 'utf8');

/** Every YAML document of a file as plain data; Compose and Kubernetes accept merge keys (<<). Throws listing parse errors. */
export function yamlDocs(p: string, text = read(p)): unknown[] {
  const docs = parseAllDocuments(text, { merge: true });
  const list = Array.isArray(docs) ? docs : [docs];
  const errors = list.flatMap((d) => d.errors.map((e) => e.message));
  if (errors.length > 0) throw new Error(`YAML errors in ${p}: ${errors.join('; ')}`);
  return list.map((d) => d.toJS({ maxAliasCount: -1 }) as unknown).filter((d) => d != null);
}

/** Parses with a schema, failing with the file and the paths of what did not fit. */
export function parseAs<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (!r.success) throw new Error(`${what}: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

// --- The code ------------------------------------------------------------------------------------

type Shape = Record<string, { safeParse(v: unknown): { success: boolean; data?: unknown } }>;
export const SHAPE = envSchema.shape as unknown as Shape;
/** Variables without a default that are not optional: every process must be given them. */
export const REQUIRED = Object.keys(SHAPE).filter((k) => !SHAPE[k]!.safeParse(undefined).success);
const defaultOf = (k: string) => SHAPE[k]!.safeParse(undefined).data;
export const API_PORT = z.number().parse(defaultOf('PORT'));
export const WORKER_PORT = z.number().parse(defaultOf('WORKER_METRICS_PORT'));

/** `NAME=value` lines of .env.example that set a value (commented lines are defaults). */
export function envExample(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of read('.env.example').split('\n')) {
    const m = /^([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
    if (m && m[2]!.trim() !== '') out[m[1]!] = m[2]!;
  }
  return out;
}

// --- Compose -------------------------------------------------------------------------------------

const stringList = z.union([z.string(), z.array(z.string())]);
const scalar = z.union([z.string(), z.number(), z.boolean(), z.null()]);
const healthcheck = z.looseObject({ test: stringList.optional() });
export const composeService = z.looseObject({
  image: z.string().optional(),
  build: z
    .union([z.string(), z.looseObject({ context: z.string(), dockerfile: z.string().optional(), args: z.record(z.string(), z.string()).optional() })])
    .optional(),
  command: stringList.optional(),
  entrypoint: stringList.optional(),
  environment: z.union([z.record(z.string(), scalar), z.array(z.string())]).optional(),
  env_file: z.union([z.string(), z.array(z.union([z.string(), z.looseObject({ path: z.string() })]))]).optional(),
  depends_on: z.union([z.array(z.string()), z.record(z.string(), z.looseObject({ condition: z.string() }))]).optional(),
  ports: z
    .array(z.union([z.string(), z.number(), z.looseObject({ target: z.number(), published: scalar.optional(), host_ip: z.string().optional() })]))
    .optional(),
  volumes: z.array(z.union([z.string(), z.looseObject({ source: z.string().optional(), target: z.string(), read_only: z.boolean().optional() })])).optional(),
  healthcheck: healthcheck.optional(),
  stop_grace_period: z.string().optional(),
  profiles: z.array(z.string()).optional(),
  restart: z.string().optional(),
  networks: z.union([z.array(z.string()), z.record(z.string(), z.looseObject({ aliases: z.array(z.string()).optional() }).nullable())]).optional(),
  deploy: z
    .looseObject({
      resources: z.looseObject({ reservations: z.looseObject({ devices: z.array(z.record(z.string(), z.unknown())).optional() }).optional() }).optional(),
    })
    .optional(),
});
export type ComposeService = z.infer<typeof composeService>;
export const composeFile = z.looseObject({
  name: z.string().optional(),
  services: z.record(z.string(), composeService),
  volumes: z.record(z.string(), z.unknown()).optional(),
});

/**
 * Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err} and
 * $$, with variables from .env (here .env.example, as `cp .env.example .env` gives).
 */
export function interpolate(text: string, vars: Record<string, string>, missing: Set<string>): string {
  return text.replace(
    /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (all: string, name?: string, op?: string, arg?: string, bare?: string) => {
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
export function interpolateDeep(v: unknown, vars: Record<string, string>, missing: Set<string>): unknown {
  if (typeof v === 'string') return interpolate(v, vars, missing);
  if (Array.isArray(v)) return v.map((x) => interpolateDeep(x, vars, missing));
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, interpolateDeep(x, vars, missing)]));
  return v;
}

export function environmentOf(svc: ComposeService): Record<string, string> {
  const env = svc.environment ?? {};
  if (Array.isArray(env)) return Object.fromEntries(env.map((e) => [e.split('=')[0]!, e.split('=').slice(1).join('=')]));
  return Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)]));
}
export const asList = (v: string | string[] | undefined): string[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);
export const healthText = (svc: ComposeService) => asList(svc.healthcheck?.test).join(' ');
export function dependsOn(svc: ComposeService): Record<string, string> {
  const d = svc.depends_on ?? {};
  if (Array.isArray(d)) return Object.fromEntries(d.map((n) => [n, 'service_started']));
  return Object.fromEntries(Object.entries(d).map(([k, v]) => [k, v.condition]));
}
/** "127.0.0.1:8000:8000" and long syntax -> host ip, published and container ports. */
export function publishedPorts(svc: ComposeService): { hostIp: string; published: number; target: number }[] {
  return (svc.ports ?? []).map((p) => {
    if (typeof p === 'object') return { hostIp: p.host_ip ?? '', published: Number(p.published), target: p.target };
    const parts = String(p).split(':');
    const target = Number(parts.pop());
    const published = Number(parts.pop() ?? target);
    return { hostIp: parts.join(':'), published, target };
  });
}
/** Volume mounts as {source, target, readOnly}. */
export function mounts(svc: ComposeService): { source: string; target: string; readOnly: boolean }[] {
  return (svc.volumes ?? []).map((v) => {
    if (typeof v === 'object') return { source: v.source ?? '', target: v.target, readOnly: v.read_only === true };
    const [source, target, mode] = v.split(':');
    return { source: source!, target: target!, readOnly: (mode ?? '').split(',').includes('ro') };
  });
}
export const isInside = (p: string, dir: string) => p === dir || p.startsWith(dir.endsWith('/') ? dir : `${dir}/`);

/** Compose durations (1m30s, 120s, 500ms) in milliseconds. */
export function durationMs(text: string): number {
  const units: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  let total = 0;
  const rest = text.replace(/(\d+(?:\.\d+)?)(us|ms|s|m|h)/g, (_, n: string, u: string) => ((total += Number(n) * units[u]!), ''));
  if (rest !== '' || text === '') throw new Error(`not a Compose duration: "${text}"`);
  return total;
}

/** The Compose Specification's JSON schema, as shipped by the dclint package (a Compose linter). */
export function composeSchemaValidator(): (doc: unknown) => ErrorObject[] {
  const require = createRequire(import.meta.url);
  const file = path.join(path.dirname(require.resolve('dclint/package.json')), 'schemas', 'compose.schema.json');
  const schema = z.record(z.string(), z.unknown()).parse(JSON.parse(readFileSync(file, 'utf8')));
  // The schema names draft-07 by a URL ajv does not preload; the keywords are draft-07's.
  delete schema.$schema;
  // Formats (duration, ports, ...) are Compose's own names; ajv would only warn about them.
  const validate = new Ajv({ strict: false, allErrors: true, validateFormats: false }).compile(schema);
  return (doc) => (validate(doc) ? [] : (validate.errors ?? []));
}

// --- Dockerfiles -------------------------------------------------------------------------------

export interface Instruction {
  op: string;
  args: string;
}
export interface Stage {
  from: string;
  name?: string;
  body: Instruction[];
}
export interface Dockerfile {
  args: Record<string, string | undefined>;
  stages: Stage[];
}

export function dockerfileOf(p: string): Dockerfile {
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
export const expand = (s: string, args: Record<string, string | undefined>) =>
  s.replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a?: string, b?: string) => args[(a ?? b)!] ?? '');
export const ops = (stage: Stage, op: string) => stage.body.filter((i) => i.op === op).map((i) => i.args);
/** COPY's [--flags] src... dest, JSON or plain form. */
export function copyArgs(args: string): { flags: string[]; sources: string[]; dest: string } {
  const words = args.split(/\s+/);
  const flags = words.filter((w) => w.startsWith('--'));
  const rest = words.filter((w) => !w.startsWith('--'));
  const all = rest[0]?.startsWith('[') ? z.array(z.string()).parse(JSON.parse(rest.join(' '))) : rest;
  return { flags, sources: all.slice(0, -1), dest: all.at(-1)! };
}
export const cmdOf = (stage: Stage) => z.array(z.string()).parse(JSON.parse(ops(stage, 'CMD').at(-1)!));

/** .dockerignore as Docker reads it: patterns in order, later ones (and !) winning. */
export function dockerignored(file: string): boolean {
  const patterns = read('.dockerignore')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const toRe = (p: string) =>
    new RegExp(
      `^${p
        .replace(/^\//, '')
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*\*/g, '\uE000')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')
        .replace(/\uE000/g, '.*')}(/.*)?$`,
    );
  let ignored = false;
  for (const p of patterns) {
    const negate = p.startsWith('!');
    if (toRe(negate ? p.slice(1) : p).test(file)) ignored = !negate;
  }
  return ignored;
}
