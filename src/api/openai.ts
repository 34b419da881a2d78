import type { FastifyError, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import type { Principal } from '../core/accounts.js';
import { z } from 'zod';
import { ProblemError, ValidationError } from '../core/errors.js';
import type { ServedModel } from '../core/fleet.js';
import { siblingImageKey, type ImageRecord, type ImagesService } from '../core/images.js';
import type { JobFollow } from '../core/job-event-stream.js';
import { createImageBody, fieldErrors, MAX_IMAGES } from '../core/params.js';
import { idempotencyKeyOf } from './idempotency.js';
import { idempotencyHeaders, openAiErrors, openAiImagesSchema, openAiModelListSchema, openAiModelSchema } from './schemas.js';

/**
 * The OpenAI Images API, for the client code that already speaks it (the official `openai`
 * package, LangChain, ...): POST /v1/images/generations and GET /v1/models, with OpenAI's error
 * shape {"error": {message, type, param, code}}.
 *
 * A generation is a job like any other (it shows in GET /generated-images, streams, sends its
 * webhook); the request waits for it, as OpenAI's endpoint does, up to `waitMs`. Fields:
 *   prompt            required
 *   n                 1..4 images (seeds seed, seed + 1, ...; batched as BATCH_MAX and the model allow)
 *   size              "WIDTHxHEIGHT" (multiples of 8, 64..2048), or "auto" / absent: the model's own size
 *   response_format   "url" (presigned, PRESIGN_TTL_SECONDS) or "b64_json"
 *   model             an id of GET /v1/models (or a known model scaled to zero, whose job waits), or
 *                     an OpenAI image model name (dall-e-2, dall-e-3, gpt-image-1, ...), which all
 *                     mean the default model (POST /generated-images without a model)
 *   user              accepted and not stored (it identifies OpenAI's end users for abuse monitoring)
 *   quality, style, background, moderation, output_format, output_compression: accepted and
 *                     ignored (they have no meaning for these models); stream: only false
 *   extensions        negative_prompt, num_steps, guidance_scale, seed, scheduler, webhook_url, as
 *                     in POST /generated-images (unset: the model's own defaults)
 * Once the job exists, its id is in the X-T2I-Job-Id header. An Idempotency-Key header makes retries safe.
 */

export interface OpenAiRoutesOptions {
  images: Pick<ImagesService, 'submit' | 'get' | 'urls'>;
  /** Who is calling (the auth hook has run): the tenant, and its key's default webhook. */
  principalOf(request: FastifyRequest): Principal;
  follow(tenantId: string, id: string): Promise<JobFollow>;
  /** The bytes of a stored image (for b64_json). */
  readImage(key: string): Promise<Buffer>;
  models(): Promise<ServedModel[]>;
  /** How long a request waits for its images before answering 504 (the job goes on). */
  waitMs: number;
}

/** Model names OpenAI clients send by default; here they mean the default model. */
const OPENAI_IMAGE_MODELS = new Set(['dall-e-2', 'dall-e-3', 'gpt-image-1', 'gpt-image-1-mini', 'gpt-image-1.5']);

const ignored = z.unknown().optional();

const generationsBody = z.strictObject({
  prompt: z.string().meta({ description: 'What to draw (the rules of POST /generated-images prompt)' }),
  model: z.string().max(200).nullish(),
  n: z.number().int().min(1).max(MAX_IMAGES).nullish(),
  size: z
    .string()
    .regex(/^(auto|\d{1,4}x\d{1,4})$/, 'must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto"')
    .nullish(),
  response_format: z.enum(['url', 'b64_json']).nullish(),
  user: z.string().max(256).nullish(),
  stream: z.literal(false, 'is not supported here: follow GET /generated-images/{id}/events for progress and previews').nullish(),
  quality: ignored,
  style: ignored,
  background: ignored,
  moderation: ignored,
  output_format: ignored,
  output_compression: ignored,
  partial_images: ignored,
  // Extensions: the native API's parameters.
  negative_prompt: createImageBody.shape.negative_prompt.optional(),
  num_steps: createImageBody.shape.num_steps.optional(),
  guidance_scale: createImageBody.shape.guidance_scale.optional(),
  seed: createImageBody.shape.seed.optional(),
  scheduler: createImageBody.shape.scheduler.optional(),
  webhook_url: createImageBody.shape.webhook_url.optional(),
});

/** The native parameter a field error is about, as the OpenAI request names it. */
const PARAM_NAMES: Record<string, string> = { width: 'size', height: 'size', num_images: 'n' };

/** An error in OpenAI's shape. */
class OpenAiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

function invalid(message: string, param: string | null, code: string | null = null): OpenAiError {
  return new OpenAiError(400, message, 'invalid_request_error', param, code);
}

function fromValidation(err: ValidationError): OpenAiError {
  const first = err.errors[0];
  const param = first ? (PARAM_NAMES[first.field] ?? first.field) : null;
  // Width and height both become `size`: one sentence each, once.
  const message = [...new Set(err.errors.map((e) => `${PARAM_NAMES[e.field] ?? e.field}: ${e.message}`))].join('; ');
  return invalid(message, param === '(body)' ? null : param, first?.rule === 'unknown_field' ? 'unknown_parameter' : null);
}

/** Any error of the app as OpenAI would put it. Public texts only, as everywhere. */
function toOpenAi(err: unknown): OpenAiError {
  if (err instanceof OpenAiError) return err;
  if (err instanceof ValidationError) return fromValidation(err);
  if (err instanceof ProblemError) {
    const type =
      err.status === 401 ? 'invalid_request_error' : err.status === 429 ? 'rate_limit_error' : err.status >= 500 ? 'server_error' : 'invalid_request_error';
    const code =
      err.status === 401
        ? 'invalid_api_key'
        : err.status === 429
          ? err.extra.quota
            ? 'insufficient_quota'
            : 'rate_limit_exceeded'
          : err.status === 422
            ? 'idempotency_key_reused'
            : err.status === 503
              ? 'service_unavailable'
              : null;
    return new OpenAiError(err.status, err.message, type, null, code, err.headers);
  }
  const fe = err as FastifyError;
  if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return new OpenAiError(413, 'The request body is too large.', 'invalid_request_error');
  if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return new OpenAiError(415, 'Send the body as application/json.', 'invalid_request_error');
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return invalid(
      fe.code === 'FST_ERR_CTP_EMPTY_JSON_BODY' ? 'The request body is empty; send a JSON object.' : `The request body is not valid JSON: ${fe.message}`,
      null,
    );
  }
  return new OpenAiError(500, 'The server failed to handle the request; it has been logged.', 'server_error');
}

function sendOpenAi(reply: FastifyReply, e: OpenAiError) {
  for (const [k, v] of Object.entries(e.headers)) reply.header(k, v);
  return reply.status(e.status).send({ error: { message: e.message, type: e.type, param: e.param, code: e.code } });
}

export const openAiRoutes: FastifyPluginAsync<OpenAiRoutesOptions> = async (app, opts) => {
  app.setErrorHandler((err, request, reply) => {
    const e = toOpenAi(err);
    if (e.status >= 500 && !(err instanceof ProblemError)) request.log.error({ err }, 'request failed');
    return sendOpenAi(reply, e);
  });

  app.get(
    '/v1/models',
    { schema: { tags: ['openai'], summary: 'The models the fleet serves (OpenAI shape)', response: { 200: openAiModelListSchema, ...openAiErrors(503) } } },
    async () => {
      const models = await opts.models();
      return { object: 'list', data: models.map(modelJson) };
    },
  );

  const modelSchema = {
    tags: ['openai'],
    summary: 'One model (OpenAI shape)',
    params: z.object({ model: z.string() }),
    response: { 200: openAiModelSchema, ...openAiErrors(404, 503) },
  };
  app.get<{ Params: { model: string } }>('/v1/models/:model', { schema: modelSchema }, async (request) => {
    const found = (await opts.models()).find((m) => m.id === request.params.model);
    if (!found)
      throw new OpenAiError(
        404,
        `The model '${request.params.model}' does not exist or no worker serves it now.`,
        'invalid_request_error',
        'model',
        'model_not_found',
      );
    return modelJson(found);
  });

  const generationsSchema = {
    tags: ['openai'],
    summary: 'Create images (OpenAI Images API); waits for them',
    description:
      'n 1..4 (seeds seed, seed+1, ...), size "WxH" (multiples of 8, 64..2048) or "auto" (the model\'s own size), response_format url or b64_json, model (an id of GET /v1/models, or an OpenAI image model name: the default model), user (not stored); quality, style, background, moderation, output_format, output_compression, partial_images are ignored. Extensions: negative_prompt, num_steps, guidance_scale, seed, scheduler, webhook_url (unset: the model\'s defaults). The job id is in X-T2I-Job-Id.',
    headers: idempotencyHeaders,
    body: generationsBody,
    response: { 200: openAiImagesSchema, ...openAiErrors(400, 401, 404, 409, 413, 415, 422, 429, 500, 503, 504) },
  };
  app.post('/v1/images/generations', { schema: generationsSchema }, async (request, reply) => {
    const b = request.body as z.infer<typeof generationsBody>;
    const model = b.model == null || OPENAI_IMAGE_MODELS.has(b.model) ? null : b.model;
    const notFound = () =>
      new OpenAiError(
        404,
        `The model '${b.model}' does not exist or no worker serves it now; see GET /v1/models.`,
        'invalid_request_error',
        'model',
        'model_not_found',
      );
    const size = b.size && b.size !== 'auto' ? b.size.split('x').map(Number) : undefined;
    const native = createImageBody.safeParse(
      {
        prompt: b.prompt,
        model,
        ...(size ? { width: size[0], height: size[1] } : {}),
        num_images: b.n ?? 1,
        ...pick(b, ['negative_prompt', 'num_steps', 'guidance_scale', 'seed', 'scheduler', 'webhook_url']),
      },
      { reportInput: true },
    );
    if (!native.success) {
      if (native.error.issues.some((i) => i.path[0] === 'model')) throw notFound();
      throw fromValidation(new ValidationError(fieldErrors(native.error)));
    }
    const caller = opts.principalOf(request);
    const tenantId = caller.tenantId;
    const { record } = await opts.images
      .submit(tenantId, native.data, {
        idempotencyKey: idempotencyKeyOf(request),
        route: 'v1/images/generations',
        defaultWebhookUrl: caller.webhookUrl,
      })
      .catch((err: unknown) => {
        // A model nobody serves (named, or the default): OpenAI's answer for an unknown model.
        if (model !== null && err instanceof ValidationError && err.errors.some((e) => e.field === 'model')) throw notFound();
        throw err;
      });
    reply.header('x-t2i-job-id', record.id);
    // From here a job exists: a client retry would make another (unless it sent an Idempotency-Key).
    reply.header('x-should-retry', 'false');

    const outcome = await waitFor(tenantId, record.id);
    if (outcome === 'timeout') {
      throw new OpenAiError(
        504,
        `The images were not ready within ${Math.round(opts.waitMs / 1000)} s. The job goes on: follow it at /generated-images/${record.id}.`,
        'server_error',
        null,
        'timeout',
      );
    }
    const job = await opts.images.get(tenantId, record.id);
    if (job.status !== 'succeeded') throw failureOf(job);
    const format = b.response_format ?? 'url';
    const data =
      format === 'url'
        ? (await opts.images.urls(tenantId, job.id)).map((i) => ({ url: i.url }))
        : await Promise.all(
            Array.from({ length: job.numImages }, async (_, k) => ({ b64_json: (await opts.readImage(siblingImageKey(job.fileName!, k))).toString('base64') })),
          );
    return { created: Math.floor(job.createdAt.getTime() / 1000), data };
  });

  /** Follows the job to its end, or gives up after waitMs. */
  async function waitFor(tenantId: string, id: string): Promise<'ended' | 'timeout'> {
    const follow = await opts.follow(tenantId, id);
    const timer = setTimeout(() => follow.close(), opts.waitMs);
    try {
      for await (const e of follow) if (e.event === 'done' || e.event === 'failed' || e.event === 'canceled') return 'ended';
      return 'timeout';
    } finally {
      clearTimeout(timer);
      follow.close();
    }
  }
};

function failureOf(job: ImageRecord): OpenAiError {
  if (job.status === 'canceled') return new OpenAiError(409, 'The job was canceled before its images were made.', 'invalid_request_error', null, 'canceled');
  const code = job.errorCode ?? 'internal';
  const message = job.error ?? 'The generation failed.';
  if (code === 'invalid_for_model' || code === 'out_of_memory') return new OpenAiError(400, message, 'invalid_request_error', null, code);
  return new OpenAiError(500, message, 'server_error', null, code);
}

function modelJson(m: ServedModel) {
  return { id: m.id, object: 'model', created: Math.floor(new Date(m.since).getTime() / 1000), owned_by: 't2i' };
}

function pick<T extends Record<string, unknown>>(o: T, keys: Array<keyof T>): Partial<T> {
  return Object.fromEntries(keys.filter((k) => o[k] !== undefined).map((k) => [k, o[k]])) as Partial<T>;
}
