import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import cors from '@fastify/cors';
import helmet from '@fastify/helmet';
import type { FastifyInstance } from 'fastify';

/**
 * What the API does at its edge, for every route: security headers, CORS (off unless origins
 * are configured) and request ids.
 */

/** A caller's X-Request-Id is kept only when it is this plain: it ends up in every log line of the request. */
const PLAIN_REQUEST_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$/;

/**
 * The request's id: the caller's X-Request-Id when it is short and plain (letters, digits and
 * . _ : -, at most 64), so a request can be followed through a client's own logs; otherwise a new
 * UUID. Anything longer or odder (a header used to smuggle text into logs, or a secret pasted by
 * mistake) is not echoed or logged.
 */
export function requestIdOf(raw: IncomingMessage): string {
  const given = raw.headers['x-request-id'];
  return typeof given === 'string' && PLAIN_REQUEST_ID.test(given) ? given : randomUUID();
}

/** Registers on the root instance itself (both plugins are global), so every route and error answer gets the headers. */
export function registerEdges(app: FastifyInstance, opts: { corsOrigins?: string[] | undefined }): void {
  // A JSON API serves no documents: nothing may be framed, scripted or embedded from it.
  void app.register(helmet, {
    global: true,
    contentSecurityPolicy: { useDefaults: false, directives: { defaultSrc: ["'none'"], frameAncestors: ["'none'"] } },
  });
  if (opts.corsOrigins && opts.corsOrigins.length > 0) {
    void app.register(cors, {
      origin: opts.corsOrigins,
      methods: ['GET', 'POST', 'DELETE'],
      allowedHeaders: ['authorization', 'content-type', 'x-request-id'],
      exposedHeaders: ['location', 'retry-after', 'x-request-id', 'ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset', 'ratelimit-policy'],
      // Keys travel in the Authorization header, never in cookies.
      credentials: false,
      maxAge: 600,
    });
  }
}
