import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { collectDefaultMetrics, Counter, Histogram, Registry } from 'prom-client';
import { hasBearer } from '../core/bearer.js';
import { sendProblem } from './problem.js';

/**
 * The API's Prometheus metrics, on its own port at GET /metrics. Each API process keeps its own
 * Registry and is its own scrape target: with several replicas, Prometheus scrapes each one and
 * queries sum over them (there is no cluster aggregation: run one Node process per container).
 */

/** Route label of requests no route matched (404s on arbitrary paths), so their paths cannot blow up the series count. */
export const UNMATCHED_ROUTE = 'unmatched';

const METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']);

/**
 * Seconds. Dense from 5 ms to 1 s (where API requests live), then up to 30 s for slow storage or
 * a struggling database: histogram_quantile interpolates within a bucket, so p50–p99 are only as
 * good as the buckets around them.
 */
export const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30];
/** Bytes, 64 B to 4 MiB (bodies are capped by BODY_LIMIT_BYTES; image lists are the largest answers). */
export const SIZE_BUCKETS = [64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304];

export interface ApiMetrics {
  registry: Registry;
  requests: Counter<'method' | 'route' | 'status_class'>;
  duration: Histogram<'method' | 'route' | 'status_class'>;
  requestSize: Histogram<'method' | 'route'>;
  responseSize: Histogram<'method' | 'route' | 'status_class'>;
}

export function createApiMetrics(): ApiMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const labelNames = ['method', 'route', 'status_class'] as const;
  return {
    registry,
    requests: new Counter({
      name: 'http_requests_total',
      help: 'HTTP requests answered, by method, route pattern and status class (2xx, 4xx, 5xx).',
      labelNames,
      registers: [registry],
    }),
    duration: new Histogram({
      name: 'http_request_duration_seconds',
      help: 'Time from receiving a request to sending its response, in seconds.',
      labelNames,
      buckets: DURATION_BUCKETS,
      registers: [registry],
    }),
    requestSize: new Histogram({
      name: 'http_request_size_bytes',
      help: 'Size of request bodies, in bytes (Content-Length; 0 without a body).',
      labelNames: ['method', 'route'],
      buckets: SIZE_BUCKETS,
      registers: [registry],
    }),
    responseSize: new Histogram({
      name: 'http_response_size_bytes',
      help: 'Size of response bodies, in bytes.',
      labelNames,
      buckets: SIZE_BUCKETS,
      registers: [registry],
    }),
  };
}

function routeOf(request: FastifyRequest): string {
  // The pattern (/generated-images/:id), never the path: ids would make one series per image.
  return request.routeOptions.url ?? UNMATCHED_ROUTE;
}

function methodOf(request: FastifyRequest): string {
  return METHODS.has(request.method) ? request.method : 'other';
}

function byteLength(payload: unknown): number | undefined {
  if (typeof payload === 'string') return Buffer.byteLength(payload);
  if (Buffer.isBuffer(payload)) return payload.length;
  return undefined;
}

/**
 * Adds the hooks that measure every request, and GET /metrics behind the bearer token. The API's
 * port faces users, so without a token there is no /metrics route at all (404, like any unknown path).
 */
export function registerApiMetrics(app: FastifyInstance, metrics: ApiMetrics, opts: { token?: string | undefined } = {}): void {
  const sizes = new WeakMap<FastifyRequest, number>();

  app.addHook('onSend', async (request, _reply, payload) => {
    const n = byteLength(payload);
    if (n !== undefined) sizes.set(request, n);
  });

  app.addHook('onResponse', async (request: FastifyRequest, reply: FastifyReply) => {
    const route = routeOf(request);
    const method = methodOf(request);
    const labels = { method, route, status_class: `${Math.floor(reply.statusCode / 100)}xx` };
    metrics.requests.inc(labels);
    metrics.duration.observe(labels, reply.elapsedTime / 1000);
    metrics.requestSize.observe({ method, route }, Number(request.headers['content-length'] ?? 0) || 0);
    const sent = sizes.get(request) ?? Number(reply.getHeader('content-length') ?? 0);
    metrics.responseSize.observe(labels, Number.isFinite(sent) ? sent : 0);
  });

  if (opts.token) registerMetricsRoute(app, metrics.registry, opts.token);
}

/** GET /metrics for a registry, behind a bearer token when one is given (API and worker alike). */
export function registerMetricsRoute(app: FastifyInstance, registry: Registry, token: string | undefined): void {
  // Scraped every few seconds: its request lines would drown the others, so only warnings are logged.
  app.get('/metrics', { logLevel: 'warn' }, async (request, reply) => {
    if (token && !hasBearer(request.headers.authorization, token)) {
      reply.header('www-authenticate', 'Bearer realm="metrics"');
      return sendProblem(reply, 401, 'Unauthorized', 'GET /metrics needs the metrics bearer token.');
    }
    return reply.type(registry.contentType).send(await registry.metrics());
  });
}
