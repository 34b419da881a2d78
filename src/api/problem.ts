import type { FastifyReply } from 'fastify';
import { redactApiKeys } from '../core/api-keys.js';

/**
 * Every error body the HTTP servers send (the API and the worker's health server) is one shape:
 * application/problem+json (RFC 9457) with type, title, status and detail, plus extra members
 * such as `errors` for validation failures. Details are public: no hosts, paths or variable names.
 */

export const PROBLEM_TYPE = 'application/problem+json';

export function problemType(status: number, title: string): string {
  return status === 500 ? 'about:blank' : `https://t2i.dev/problems/${title.toLowerCase().replace(/[^a-z0-9]+/g, '-')}`;
}

export function sendProblem(reply: FastifyReply, status: number, title: string, detail: string, extra: Record<string, unknown> = {}) {
  return (
    reply
      .status(status)
      .type(PROBLEM_TYPE)
      // A detail or a field name may quote what the client sent (an id, a path, a body's keys):
      // never an API key's secret.
      .send({ type: problemType(status, title), title, status, detail: redactApiKeys(detail), ...(JSON.parse(redactApiKeys(JSON.stringify(extra))) as object) })
  );
}
