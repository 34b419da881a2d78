import { Validator } from '@seriousme/openapi-schema-validator';
import { Ajv2020 } from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import { expect } from 'vitest';

/**
 * The API's OpenAPI document as a test oracle: it must validate as OpenAPI 3.1, and every answer
 * the API tests receive must match the schema it documents for that route, status and content
 * type. A checker collects what did not match; tests assert that nothing did.
 */

interface OpenApiDoc {
  openapi: string;
  paths: Record<string, Record<string, { responses?: Record<string, { content?: Record<string, { schema?: unknown }> }> }>>;
}

/** Validates the document against the OpenAPI 3.1 schema; returns the errors. */
export async function documentErrors(doc: unknown): Promise<unknown[]> {
  const result = await new Validator().validate(doc as Parameters<Validator['validate']>[0]);
  return result.valid ? [] : ((result.errors as unknown[] | undefined) ?? ['invalid']);
}

export interface ResponseChecker {
  /** Checks one answer; `path` is the request path (query string allowed). */
  check(method: string, path: string, status: number, contentType: string | null, body: unknown): void;
  /** Checks an answer of no route (the 404 for an unknown path): a documented Problem. */
  checkUnrouted(method: string, path: string, status: number, contentType: string | null, body: unknown): void;
  /** Answers checked, by "METHOD route status". */
  readonly seen: Map<string, number>;
  /** What did not match, one line each. */
  readonly mismatches: string[];
  /** Fails the test if any answer did not match. */
  expectNoMismatch(): void;
}

const escapePointer = (s: string) => s.replace(/~/g, '~0').replace(/\//g, '~1');

export function responseChecker(document: unknown): ResponseChecker {
  const doc = document as OpenApiDoc;
  const ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: true });
  addFormats.default(ajv);
  // The whole document under one id, so schemas' "#/components/schemas/X" references resolve.
  ajv.addSchema({ ...doc, $id: 'openapi.json' });
  const routes = Object.keys(doc.paths).map((template) => ({
    template,
    pattern: new RegExp(`^${template.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{[^}]+\}/g, '[^/]+')}$`),
  }));
  const seen = new Map<string, number>();
  const mismatches: string[] = [];
  return {
    seen,
    mismatches,
    check(method, path, status, contentType, body) {
      const bare = path.split('?')[0]!;
      const route = routes.find((r) => r.pattern.test(bare));
      const where = `${method} ${route?.template ?? bare} ${status}`;
      seen.set(where, (seen.get(where) ?? 0) + 1);
      if (!route) return void mismatches.push(`${where}: no such path in the document`);
      const op = doc.paths[route.template]![method.toLowerCase()];
      if (!op) return void mismatches.push(`${where}: the document has no ${method} for this path`);
      const responses = op.responses ?? {};
      const code = String(status) in responses ? String(status) : 'default' in responses ? 'default' : undefined;
      if (!code) return void mismatches.push(`${where}: status not documented (documented: ${Object.keys(responses).join(', ')})`);
      const type = (contentType ?? '').split(';')[0]!.trim();
      const content = responses[code]!.content ?? {};
      if (Object.keys(content).length === 0) return;
      if (!(type in content)) return void mismatches.push(`${where}: content type ${type} not documented (documented: ${Object.keys(content).join(', ')})`);
      if (content[type]!.schema === undefined || type === 'text/event-stream') return;
      const ref = `openapi.json#/paths/${escapePointer(route.template)}/${method.toLowerCase()}/responses/${code}/content/${escapePointer(type)}/schema`;
      const validate = ajv.getSchema(ref);
      if (!validate) return void mismatches.push(`${where}: could not compile ${ref}`);
      if (!validate(body)) mismatches.push(`${where}: ${ajv.errorsText(validate.errors)} in ${JSON.stringify(body).slice(0, 300)}`);
    },
    checkUnrouted(method, path, status, contentType, body) {
      const where = `${method} ${path} ${status} (no route)`;
      if (!(contentType ?? '').startsWith('application/problem+json')) return void mismatches.push(`${where}: not problem+json`);
      const validate = ajv.getSchema('openapi.json#/components/schemas/Problem');
      if (!validate) return void mismatches.push(`${where}: the document has no Problem schema`);
      if (!validate(body)) mismatches.push(`${where}: ${ajv.errorsText(validate.errors)}`);
    },
    expectNoMismatch() {
      expect(mismatches, 'answers that do not match the OpenAPI document').toEqual([]);
    },
  };
}

/** fetch that hands every JSON answer to the checker (for tests against API processes). */
export function checkedFetch(checker: ResponseChecker): typeof fetch {
  return async (input, init) => {
    const res = await fetch(input, init);
    const url = new URL(typeof input === 'string' ? input : input instanceof URL ? input.href : input.url);
    const type = res.headers.get('content-type');
    const method = (init?.method ?? (input instanceof Request ? input.method : 'GET')).toUpperCase();
    if (type?.startsWith('text/event-stream')) {
      checker.check(method, url.pathname, res.status, type, undefined);
      return res;
    }
    const text = await res.clone().text();
    let body: unknown = text;
    if (type?.includes('json')) body = text ? (JSON.parse(text) as unknown) : undefined;
    checker.check(method, url.pathname, res.status, type, body);
    return res;
  };
}
