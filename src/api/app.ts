import Fastify, { type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { DependencyUnavailableError, ProblemError, ValidationError } from '../core/errors.js';
import type { ErrorReporter } from '../core/reporting.js';
import type { ImagesService } from '../core/images.js';
import { imageJson } from '../core/image-json.js';
import { createImageBody, fieldErrors, listQuery } from '../core/params.js';
import { readiness } from '../core/lifecycle.js';
import { eventRoutes, type EventRoutesOptions } from './events.js';
import { discoveryRoutes, type DiscoveryOptions } from './discovery.js';
import { idempotencyKeyOf } from './idempotency.js';
import { openAiRoutes, type OpenAiRoutesOptions } from './openai.js';
import { registerOpenApi } from './openapi.js';
import { webhookRoutes, type WebhookRoutesOptions } from './webhooks.js';
import { registerApiMetrics, type ApiMetrics } from './metrics.js';
import { sendProblem } from './problem.js';

/**
 * The HTTP API as a Fastify instance that tests build and inject into; src/api/main.ts boots
 * it. Every error leaves as application/problem+json with type, title, status and detail.
 */

export interface AppDeps {
  images: ImagesService;
  logger: Logger;
  bodyLimit: number;
  /** Readiness of what the API depends on; the route answers 503 listing what is down. */
  checks?: Record<string, () => Promise<void>>;
  /** Request metrics and GET /metrics (src/api/metrics.ts); none when absent. */
  metrics?: ApiMetrics;
  /** Bearer token GET /metrics requires (METRICS_TOKEN); open when unset. */
  metricsToken?: string | undefined;
  /** Where 5xx errors are reported (Sentry); client errors never are. */
  reporter?: ErrorReporter;
  /** Live job events over SSE and WebSocket (src/api/events.ts); the routes are absent without it. */
  events?: EventRoutesOptions;
  /** Webhook delivery records (src/api/webhooks.ts); the route is absent without them. */
  webhooks?: Omit<WebhookRoutesOptions, 'images'>;
  /** The OpenAI-compatible routes (src/api/openai.ts); absent without them. */
  openai?: Omit<OpenAiRoutesOptions, 'images'>;
  /** GET /models and /schedulers (src/api/discovery.ts); absent without them. */
  discovery?: DiscoveryOptions;
}

export function buildApp(deps: AppDeps): FastifyInstance {
  const app = Fastify({
    // Widened to Fastify's logger type so the app is a plain FastifyInstance (the rule only sees the argument).
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion
    loggerInstance: deps.logger as FastifyBaseLogger,
    bodyLimit: deps.bodyLimit,
    // Request ids on every line the request logs; honour a caller's X-Request-Id.
    requestIdHeader: 'x-request-id',
    genReqId: () => crypto.randomUUID(),
    return503OnClosing: true,
    routerOptions: { ignoreTrailingSlash: true },
    // Errors the router raises before any route or hook runs; Fastify's default answers them as plain JSON.
    frameworkErrors: (err, request, reply) => {
      // An over-long path segment cannot be an id of anything here.
      if (err.code === 'FST_ERR_MAX_PARAM_LENGTH') return void sendProblem(reply, 404, 'Not Found', 'No resource has an id that long.');
      if (err.code === 'FST_ERR_BAD_URL') return void sendProblem(reply, 400, 'Bad Request', 'The URL is not valid: it has a malformed percent-encoding.');
      request.log.error({ err }, 'request failed in the router');
      reportServerError(request, err, 500);
      return void sendProblem(reply, 500, 'Internal Server Error', 'The server failed to handle the request; it has been logged.');
    },
  });

  // Only JSON bodies: Fastify parses text/plain by default, which would answer a text body with
  // "must be a JSON object" (400) instead of the 415 a wrong content type deserves.
  app.removeContentTypeParser('text/plain');

  // Before every route: the document is made from the routes' schemas as they are added.
  registerOpenApi(app);
  if (deps.metrics) registerApiMetrics(app, deps.metrics, { token: deps.metricsToken });

  // Tags only: the route pattern, never the URL (ids, query strings), and no body. An error text
  // may still quote the body (a database error echoing its values): its prompts are blanked.
  const reportServerError = (request: FastifyRequest, err: unknown, status: number) => {
    const body = request.body as Record<string, unknown> | null | undefined;
    const redact = typeof body === 'object' && body !== null ? [body.prompt, body.negative_prompt].filter((v): v is string => typeof v === 'string') : [];
    deps.reporter?.capture(err, {
      tags: { method: request.method, route: request.routeOptions.url ?? 'unmatched', status },
      extra: { requestId: request.id },
      redact,
    });
  };

  app.addHook('onSend', async (request, reply) => {
    reply.header('x-request-id', request.id);
  });

  app.setNotFoundHandler((request, reply) => sendProblem(reply, 404, 'Not Found', `No route ${request.method} ${request.url.split('?')[0]}.`));

  app.setErrorHandler((err: FastifyError | ProblemError | Error, request: FastifyRequest, reply: FastifyReply) => {
    if (err instanceof DependencyUnavailableError) {
      // Postgres or Redis unreachable: a quick 503 the client can retry, not a 500 or a hang.
      // The cause (hosts, ports, driver codes) stays in the log.
      request.log.warn({ err: err.cause ?? err }, `${err.dependency} unavailable`);
    } else if (err instanceof ProblemError && err.status >= 500) {
      reportServerError(request, err, err.status);
    }
    if (err instanceof ProblemError) {
      for (const [k, v] of Object.entries(err.headers)) reply.header(k, v);
      return sendProblem(reply, err.status, err.title, err.message, err.extra);
    }
    const fe = err as FastifyError;
    // Fastify's own client errors: body too large, bad JSON, wrong content type.
    if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE')
      return sendProblem(reply, 413, 'Payload Too Large', `The request body is larger than ${deps.bodyLimit} bytes.`);
    if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return sendProblem(reply, 415, 'Unsupported Media Type', 'Send the body as application/json.');
    if (fe.code === 'FST_ERR_CTP_EMPTY_JSON_BODY')
      return sendProblem(reply, 400, 'Invalid request', 'The request body is empty; send a JSON object.', {
        errors: [{ field: '(body)', rule: 'required', message: 'is required' }],
      });
    if (fe.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || (fe.statusCode === 400 && err instanceof SyntaxError)) {
      return sendProblem(reply, 400, 'Invalid request', `The request body is not valid JSON: ${err.message}`, {
        errors: [{ field: '(body)', rule: 'json', message: 'is not valid JSON' }],
      });
    }
    if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
      return sendProblem(reply, fe.statusCode, 'Bad Request', err.message);
    }
    request.log.error({ err }, 'request failed');
    reportServerError(request, err, 500);
    return sendProblem(reply, 500, 'Internal Server Error', 'The server failed to handle the request; it has been logged.');
  });

  app.post('/generated-images', async (request, reply) => {
    const body = request.body;
    if (typeof body !== 'object' || body === null || Array.isArray(body)) {
      throw new ValidationError([{ field: '(body)', rule: 'type', message: 'must be a JSON object' }]);
    }
    // reportInput: zod 4 leaves `input` off issues otherwise, and fieldErrors would call every wrongly typed field "required".
    const parsed = createImageBody.safeParse(body, { reportInput: true });
    if (!parsed.success) throw new ValidationError(fieldErrors(parsed.error));
    const { record, replayed } = await deps.images.submit(parsed.data, { idempotencyKey: idempotencyKeyOf(request), route: 'generated-images' });
    if (replayed) reply.header('idempotent-replayed', 'true');
    return reply.status(201).header('location', `/generated-images/${record.id}`).send(imageJson(record));
  });

  app.get('/generated-images', async (request) => {
    const parsed = listQuery.safeParse(request.query, { reportInput: true });
    if (!parsed.success) throw new ValidationError(fieldErrors(parsed.error));
    const { items, nextCursor } = await deps.images.list(parsed.data.limit, parsed.data.cursor);
    return { items: items.map(imageJson), next_cursor: nextCursor };
  });

  app.get<{ Params: { id: string } }>('/generated-images/:id', async (request) => imageJson(await deps.images.get(request.params.id)));

  app.get<{ Params: { id: string } }>('/generated-images/:id/url', async (request) => {
    const images = await deps.images.urls(request.params.id);
    const { url, expiresAt } = images[0]!;
    // `url` is image 0 (the textbook's answer, unchanged for one image); a job of several lists them all in `images`.
    return {
      url,
      expires_at: expiresAt.toISOString(),
      ...(images.length > 1 ? { images: images.map((i) => ({ index: i.index, seed: i.seed, url: i.url })) } : {}),
    };
  });

  app.post<{ Params: { id: string } }>('/generated-images/:id/cancel', async (request) => imageJson(await deps.images.cancel(request.params.id)));

  if (deps.events) void app.register(eventRoutes, deps.events);
  if (deps.webhooks) void app.register(webhookRoutes, { images: deps.images, ...deps.webhooks });
  if (deps.openai) void app.register(openAiRoutes, { images: deps.images, ...deps.openai });
  if (deps.discovery) void app.register(discoveryRoutes, deps.discovery);

  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async (request, reply) => {
    const { ok, checks, errors } = await readiness(deps.checks ?? {});
    if (!ok) {
      // Which dependency is down is public; why (hosts, ports, driver messages) is logged only.
      request.log.warn({ errors }, 'not ready');
      return sendProblem(reply, 503, 'Service Unavailable', `Not ready: ${Object.keys(errors).join(', ')} unreachable.`, { checks });
    }
    return { status: 'ready', checks };
  });

  return app;
}
