import { createHash } from 'node:crypto';

/**
 * Idempotent submits: a client's Idempotency-Key holds for 24 hours, and "the same request"
 * means the same route and the same validated body, whatever the order of its fields.
 */

/** How long an Idempotency-Key holds. */
export const IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000;

/** What "the same request" means for an Idempotency-Key: the route and the validated body, keys sorted. */
export function requestFingerprint(route: string, body: unknown): string {
  return createHash('sha256').update(route).update('\n').update(canonicalJson(body)).digest('hex');
}

function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>)
      .filter(([, x]) => x !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, x]) => `${JSON.stringify(k)}:${canonicalJson(x)}`).join(',')}}`;
  }
  return JSON.stringify(v);
}
