import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { DependencyUnavailableError, ProblemError } from '../core/errors.js';
import type { ErrorReporter } from '../core/reporting.js';
import type { AccountsService } from '../core/accounts.js';
import type { ImageRecord, ImagesService } from '../core/images.js';
import { imageJson } from '../core/image-json.js';
import { createImageBody, listQuery } from '../core/params.js';
import { readiness } from '../core/lifecycle.js';
import type { TrustProxy } from '../config.js';
import { principalOf, registerAuth, type RateLimitOptions } from './auth.js';
import { discoveryRoutes, type DiscoveryOptions } from './discovery.js';
import { registerEdges, requestIdOf } from './edges.js';
import { eventRoutes, type EventRoutesOptions } from './events.js';
import { idempotencyKeyOf } from './idempotency.js';
import { openAiRoutes, type OpenAiRoutesOptions } from './openai.js';
import { registerOpenApi } from './openapi.js';
import { jobRouteSchemas, problems, usageSchema } from './schemas.js';
import { multipartCreateBody, registerUploads, submissionOf, type UploadLimits } from './uploads.js';
import { webhookRoutes, type WebhookRoutesOptions } from './webhooks.js';
import { imageFileRoutes, type ImageFileRoutesOptions } from './image-files.js';
import { webPageRoutes, type WebPageOptions } from './web.js';
import { registerApiMetrics, type ApiMetrics } from './metrics.js';
import { sendProblem } from './problem.js';

/**
 * The HTTP API as a Fastify instance that tests build and inject into; src/api/main.ts boots
 * it. Every error leaves as application/problem+json with type, title, status and detail.
 */

export interface AppDeps {
  images: ImagesService;
  /** Tells who sent a request (API keys); every /generated-images and /usage route is scoped to that tenant. */
  accounts: AccountsService;
  /** AUTH: 'off' makes every caller the anonymous tenant (main.ts allows it on loopback only). Default 'required'. */
  auth?: 'required' | 'off';
  /** Per-key and per-address limits (Redis-backed); none when absent. */
  rateLimits?: RateLimitOptions;
  /** CORS_ORIGINS: browser origins allowed to call the API; CORS is off when absent. */
  corsOrigins?: string[] | undefined;
  /** TRUST_PROXY: which proxies' X-Forwarded-For gives the client address. Default: none. */
  trustProxy?: TrustProxy;
  logger: Logger;
  bodyLimit: number;
  /** MAX_UPLOAD_BYTES: each input picture of a multipart POST /generated-images. Default 16 MiB. */
  maxUploadBytes?: number;
  /** Readiness of what the API depends on; the route answers 503 listing what is down. */
  checks?: Record<string, () => Promise<void>>;
  /** Request metrics and GET /metrics (src/api/metrics.ts); none when absent. */
  metrics?: ApiMetrics;
  /** Bearer token GET /metrics requires (METRICS_TOKEN); without one the API serves no /metrics (its port is public). */
  metricsToken?: string | undefined;
  /** Where 5xx errors are reported (Sentry); client errors never are. */
  reporter?: ErrorReporter;
  /** Live job events over SSE and WebSocket (src/api/events.ts); the routes are absent without it. */
  events?: Omit<EventRoutesOptions, 'tenantOf'>;
  /** Webhook delivery records (src/api/webhooks.ts); the route is absent without them. */
  webhooks?: Omit<WebhookRoutesOptions, 'images' | 'tenantOf'>;
  /** The OpenAI-compatible routes (src/api/openai.ts); absent without them. */
  openai?: Omit<OpenAiRoutesOptions, 'images' | 'principalOf'>;
  /** GET /models and /schedulers (src/api/discovery.ts); absent without them. */
  discovery?: DiscoveryOptions;
  /** A succeeded job's images through the API (src/api/image-files.ts), for the web page; absent without it. */
  imageFiles?: Omit<ImageFileRoutesOptions, 'images' | 'tenantOf'>;
  /** The web page at / (src/api/web.ts); absent without it. */
  web?: WebPageOptions;
}

/**
 * One line per request, once it is answered (method, URL, caller, status and time), instead of
 * Fastify's two: the API's own writes were a third of its CPU under load (the service bench's
 * profile). A route with a quieter logLevel (the /metrics scrapes) leaves it out, as before.
 */
class OneLinePerRequest extends LogController {
  override incomingRequest(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (this.isLogDisabled(request)) return;
    if (error) reply.log.error({ req: request, res: reply, err: error, responseTime: reply.elapsedTime }, 'request errored');
    else reply.log.info({ req: request, res: reply, responseTime: reply.elapsedTime }, 'request completed');
  }
}

function trustHops(n: number) {
  return (_address: string, hop: number) => hop < n;
}

export function buildApp(deps: AppDeps): FastifyInstance {
  const app = Fastify({
    // Widened to Fastify's logger type so the app is a plain FastifyInstance (the rule only sees the argument).
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion
    loggerInstance: deps.logger as FastifyBaseLogger,
    bodyLimit: deps.bodyLimit,
    // Request ids on every line the request logs: a caller's X-Request-Id only when short and plain.
    requestIdHeader: false,
    genReqId: requestIdOf,
    // The client address rate limits and logs use: the socket's, unless proxies are trusted.
    // A hop count as the function Fastify's types ask for (trust the n addresses nearest to us).
    trustProxy: typeof deps.trustProxy === 'number' ? trustHops(deps.trustProxy) : (deps.trustProxy ?? false),
    return503OnClosing: true,
    logController: new OneLinePerRequest(),
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
  registerEdges(app, { corsOrigins: deps.corsOrigins });
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
    if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE')
      return sendProblem(
        reply,
        415,
        'Unsupported Media Type',
        'Send the body as application/json (POST /generated-images also takes multipart/form-data with pictures).',
      );
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

  // Everything a tenant can see or do: behind the auth hook, and scoped to the caller's tenant.
  // Another tenant's job answers exactly as an unknown id does (404).
  void app.register(async (scope) => {
    await registerAuth(scope, { accounts: deps.accounts, mode: deps.auth ?? 'required', rateLimits: deps.rateLimits });
    const tenant = (request: FastifyRequest) => principalOf(request).tenantId;

    const schemas = jobRouteSchemas(createImageBody, listQuery, multipartCreateBody);
    // A job as the API shows it: with why it waits, when no worker serves its model now.
    const jobView = async (record: ImageRecord) => ({ ...imageJson(record), hold: await deps.images.hold(record) });
    const uploads: UploadLimits = { maxFileBytes: deps.maxUploadBytes ?? 16 * 1024 * 1024, maxRequestBytes: deps.bodyLimit };

    // Its own plugin: only this route parses multipart bodies (src/api/uploads.ts).
    await scope.register(async (create) => {
      await registerUploads(create, uploads);
      create.post('/generated-images', { schema: schemas.create }, async (request, reply) => {
        const p = principalOf(request);
        const { body, inputs } = await submissionOf(request, uploads);
        const { record, replayed } = await deps.images.submit(p.tenantId, body, {
          idempotencyKey: idempotencyKeyOf(request),
          route: 'generated-images',
          defaultWebhookUrl: p.webhookUrl,
          ...(inputs ? { inputs } : {}),
        });
        if (replayed) reply.header('idempotent-replayed', 'true');
        return reply
          .status(201)
          .header('location', `/generated-images/${record.id}`)
          .send(await jobView(record));
      });
    });

    scope.get('/generated-images', { schema: schemas.list }, async (request) => {
      const q = request.query as { limit: number; cursor?: string };
      const { items, nextCursor } = await deps.images.list(tenant(request), q.limit, q.cursor);
      return { items: await Promise.all(items.map(jobView)), next_cursor: nextCursor };
    });

    scope.get<{ Params: { id: string } }>('/generated-images/:id', { schema: schemas.get }, async (request) =>
      jobView(await deps.images.get(tenant(request), request.params.id)),
    );

    scope.get<{ Params: { id: string } }>('/generated-images/:id/url', { schema: schemas.url }, async (request) => {
      const images = await deps.images.urls(tenant(request), request.params.id);
      const { url, expiresAt } = images[0]!;
      // `url` is image 0 (the textbook's answer, unchanged for one image); a job of several lists them all in `images`.
      return {
        url,
        expires_at: expiresAt.toISOString(),
        ...(images.length > 1 ? { images: images.map((i) => ({ index: i.index, seed: i.seed, url: i.url })) } : {}),
      };
    });

    scope.post<{ Params: { id: string } }>('/generated-images/:id/cancel', { schema: schemas.cancel }, async (request) =>
      imageJson(await deps.images.cancel(tenant(request), request.params.id)),
    );

    // Removes the image objects and the prompts; the job is gone for its owner (404 afterwards).
    scope.delete<{ Params: { id: string } }>('/generated-images/:id', { schema: schemas.delete }, async (request, reply) => {
      await deps.images.delete(tenant(request), request.params.id);
      return reply.status(204).send();
    });

    scope.get(
      '/usage',
      { schema: { tags: ['jobs'], summary: "Your tenant's usage today and its limits", response: { 200: usageSchema, ...problems(401, 429, 503) } } },
      async (request) => {
        const p = principalOf(request);
        const u = await deps.images.usage(p.tenantId);
        const budget = u.limits.dailyPixelSteps;
        return {
          tenant: p.tenantName,
          day: u.day.toISOString().slice(0, 10),
          resets_at: u.resetsAt.toISOString(),
          pixel_steps: { used: u.pixelStepsToday, limit: budget || null, remaining: budget ? Math.max(0, budget - u.pixelStepsToday) : null },
          in_flight: { used: u.inFlight, limit: u.limits.maxInFlight || null },
          jobs_today: u.jobsToday,
        };
      },
    );

    // The client API's areas, each a plugin of its own, in the same scope: every stream,
    // webhook record and OpenAI call is the caller's tenant's.
    if (deps.events) await scope.register(eventRoutes, { ...deps.events, tenantOf: tenant });
    if (deps.webhooks) await scope.register(webhookRoutes, { images: deps.images, tenantOf: tenant, ...deps.webhooks });
    if (deps.openai) await scope.register(openAiRoutes, { images: deps.images, principalOf, ...deps.openai });
    if (deps.discovery) await scope.register(discoveryRoutes, deps.discovery);
    if (deps.imageFiles) await scope.register(imageFileRoutes, { images: deps.images, tenantOf: tenant, ...deps.imageFiles });
  });

  // The web page: public files; everything it shows comes from the routes above, with the key.
  if (deps.web) void app.register(webPageRoutes, deps.web);

  // Public probes, in a plugin of their own so the OpenAPI generator (registered first) sees them.
  void app.register(async (app) => {
    const schemas = jobRouteSchemas(createImageBody, listQuery);
    app.get('/healthz', { schema: schemas.healthz }, async () => ({ status: 'ok' as const }));

    app.get('/readyz', { schema: schemas.readyz }, async (request, reply) => {
      const { ok, checks, errors } = await readiness(deps.checks ?? {});
      if (!ok) {
        // Which dependency is down is public; why (hosts, ports, driver messages) is logged only.
        request.log.warn({ errors }, 'not ready');
        return sendProblem(reply, 503, 'Service Unavailable', `Not ready: ${Object.keys(errors).join(', ')} unreachable.`, { checks });
      }
      return { status: 'ready' as const, checks };
    });
  });

  return app;
}
