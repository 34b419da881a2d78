import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { Registry } from 'prom-client';
import type { Logger } from 'pino';
import { registerMetricsRoute } from '../api/metrics.js';
import { sendProblem } from '../api/problem.js';
import { readiness } from '../core/lifecycle.js';

/**
 * The worker's HTTP server (WORKER_METRICS_PORT): GET /metrics for Prometheus, /healthz (the
 * process is alive) and /readyz (it can take jobs: engine up and Postgres,
 * Redis and storage reachable). A small Fastify app like the API's, with the same error shape.
 */

export interface HealthAppDeps {
  registry: Registry;
  /** Bearer token GET /metrics requires (METRICS_TOKEN); open when unset. */
  metricsToken: string | undefined;
  logger: Logger;
  /** Why the engine cannot take jobs right now (restarting, hung), or null when it can. */
  engineProblem(): string | null;
  checks: Record<string, () => Promise<void>>;
}

export function buildHealthApp(deps: HealthAppDeps): FastifyInstance {
  // The worker's logger, widened to Fastify's type (the rule only sees the argument).
  // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion
  const app = Fastify({ loggerInstance: deps.logger as FastifyBaseLogger, return503OnClosing: true });
  app.setNotFoundHandler((request, reply) => sendProblem(reply, 404, 'Not Found', `No route ${request.method} ${request.url.split('?')[0]}.`));
  app.setErrorHandler((err, request, reply) => {
    request.log.error({ err }, 'health server request failed');
    return sendProblem(reply, 500, 'Internal Server Error', 'The server failed to handle the request; it has been logged.');
  });
  registerMetricsRoute(app, deps.registry, deps.metricsToken);

  // Alive while the process serves: an engine being restarted is not a reason to kill the
  // process (that is /readyz's business); one that cannot be restarted ends the process itself.
  app.get('/healthz', { logLevel: 'warn' }, async () => ({ status: 'ok', engine: deps.engineProblem() ?? 'up' }));

  app.get('/readyz', { logLevel: 'warn' }, async (request, reply) => {
    const { ok, checks, errors } = await readiness({
      engine: async () => {
        const problem = deps.engineProblem();
        if (problem) throw new Error(problem);
      },
      ...deps.checks,
    });
    if (!ok) {
      request.log.warn({ errors }, 'not ready');
      return sendProblem(reply, 503, 'Service Unavailable', `Not ready: ${Object.keys(errors).join(', ')} unavailable.`, { checks });
    }
    return { status: 'ready', checks };
  });
  return app;
}
