import { z } from 'zod';
import { FAILURE_CODES } from '../core/failures.js';

/**
 * The shapes of the API's answers, as zod schemas: the OpenAPI document describes them
 * (src/api/openapi.ts), and the tests check every answer against the document. Each has an id,
 * so the document names it once under components and refers to it.
 */

const isoTime = z.iso.datetime({ offset: true });

export const fieldErrorSchema = z
  .object({
    field: z.string().meta({ description: 'The request field (dotted path), header or "(body)"' }),
    rule: z.string().meta({ description: 'The rule that failed: required, type, min, max, format, unknown_field, ...' }),
    message: z.string(),
  })
  .meta({ id: 'FieldError' });

export const problemSchema = z
  .looseObject({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    detail: z.string(),
    errors: z.array(fieldErrorSchema).optional().meta({ description: 'Validation failures, one per field and rule' }),
  })
  .meta({ id: 'Problem', description: 'An error (RFC 9457 problem details). Details are public; internals go to logs only.' });

const PROBLEM_TITLES: Record<number, string> = {
  400: 'Invalid request',
  401: 'No valid API key',
  404: 'No such resource (or not yours)',
  409: 'Conflict with the job’s state',
  413: 'Body too large',
  415: 'Not JSON',
  422: 'Idempotency key reused with another body',
  426: 'A WebSocket endpoint',
  429: 'Rate limit or quota exceeded',
  503: 'Unavailable: back-pressure or a dependency down; see Retry-After',
};

/** Problem answers for the given statuses, for a route's `response` map (every route behind the API key may also give 401 and 429). */
export function problems(...statuses: number[]) {
  return Object.fromEntries(
    statuses.map((s) => [s, { description: PROBLEM_TITLES[s] ?? 'Error', content: { 'application/problem+json': { schema: problemSchema } } }]),
  );
}

export const jobSchema = z
  .object({
    id: z.uuid(),
    status: z.enum(['queued', 'running', 'succeeded', 'failed', 'canceled']),
    progress: z.number().int().min(0).max(100),
    prompt: z.string(),
    negative_prompt: z.string().nullable(),
    model: z.string().nullable().meta({ description: 'The model the job runs on (null only for jobs from before models had names)' }),
    num_steps: z
      .number()
      .int()
      .nullable()
      .meta({ description: "The request's, or the model's default. Null only until a worker fills in the defaults of a model never served before" }),
    guidance_scale: z.number().nullable(),
    seed: z.number().int(),
    width: z.number().int().nullable(),
    height: z.number().int().nullable(),
    scheduler: z.string().nullable(),
    strength: z
      .number()
      .nullable()
      .meta({ description: "Image-to-image: how much of the picture is redrawn (the request's or the model's default); null otherwise" }),
    inputs: z
      .object({ image: z.boolean(), mask: z.boolean() })
      .meta({ description: 'Whether the job has an input picture (image-to-image) and a mask (inpainting)' }),
    hold: z
      .object({ reason: z.literal('no_worker'), message: z.string() })
      .nullable()
      .optional()
      .meta({ description: 'Why a queued job waits: no worker serves its model now (a known model scaled to zero); null otherwise' }),
    file_name: z.string().nullable(),
    error: z
      .object({ code: z.enum(FAILURE_CODES), message: z.string() })
      .nullable()
      .meta({ description: 'Why the job failed, or why its last attempt did' }),
    attempts: z.number().int(),
    pixel_steps: z.number().int().meta({ description: 'What the job counts against the daily budget: width x height x num_steps' }),
    num_images: z.number().int().min(1).max(4),
    webhook_url: z.string().nullable(),
    cancel_requested_at: isoTime.nullable(),
    created_at: isoTime,
    started_at: isoTime.nullable(),
    finished_at: isoTime.nullable(),
  })
  .meta({ id: 'Job' });

export const jobListSchema = z.object({ items: z.array(jobSchema), next_cursor: z.string().nullable() }).meta({ id: 'JobList' });

export const imageUrlSchema = z
  .object({
    url: z.url().meta({ description: 'Presigned GET URL of image 0' }),
    expires_at: isoTime,
    images: z
      .array(z.object({ index: z.number().int(), seed: z.number().int(), url: z.url() }))
      .optional()
      .meta({ description: 'Every image, for a job of several' }),
  })
  .meta({ id: 'ImageUrl' });

export const webhookDeliveriesSchema = z
  .object({
    items: z.array(
      z.object({
        id: z.uuid().meta({ description: 'Also the webhook-id header of every attempt' }),
        event_type: z.enum(['image.succeeded', 'image.failed', 'image.canceled']),
        url: z.string(),
        status: z.enum(['pending', 'succeeded', 'failed']),
        attempts: z.array(
          z.object({
            attempt: z.number().int(),
            started_at: isoTime,
            duration_ms: z.number().int(),
            status_code: z.number().int().nullable(),
            error: z.string().nullable(),
          }),
        ),
        next_attempt_at: isoTime.nullable(),
        created_at: isoTime,
        finished_at: isoTime.nullable(),
      }),
    ),
  })
  .meta({ id: 'WebhookDeliveries' });

const defaultsSchema = z.object({
  num_steps: z.number().int(),
  guidance_scale: z.number(),
  width: z.number().int(),
  height: z.number().int(),
  scheduler: z.string(),
  strength: z.number().optional().meta({ description: 'Image-to-image, when the request gives a picture and no strength' }),
});

export const limitsSchema = z
  .object({
    min_steps: z.number().int(),
    max_steps: z.number().int(),
    min_side: z.number().int(),
    max_side: z.number().int(),
    side_multiple_of: z.number().int(),
    max_guidance_scale: z.number(),
    max_prompt_chars: z.number().int(),
    max_images: z.number().int(),
    max_pixel_steps: z.number().int(),
  })
  .meta({ id: 'Limits' });

export const modelsSchema = z
  .object({
    models: z.array(
      z.object({
        id: z.string().meta({ description: "What a request's `model` names" }),
        status: z
          .enum(['serving', 'no_worker'])
          .meta({ description: 'serving: workers run its jobs now; no_worker: a known model with no worker now (scaled to zero), whose jobs wait' }),
        default: z.boolean().meta({ description: 'Requests that name no model run on it' }),
        variant: z.string().nullable().meta({ description: 'What loading found: "SD 1.x", "SDXL Turbo", "SD 1.x inpainting", ...' }),
        workers: z.number().int(),
        providers: z.array(z.string()),
        model_defaults: defaultsSchema.nullable().meta({ description: 'What a request leaving parameters out gets; null for a known model never served' }),
        tasks: z.array(z.enum(['text-to-image', 'image-to-image', 'inpainting'])),
        schedulers: z.array(z.string()),
        since: isoTime.nullable().meta({ description: 'When its longest-running worker loaded it; null without workers' }),
      }),
    ),
    request_defaults: defaultsSchema
      .extend({ num_images: z.number().int(), model: z.string() })
      .nullable()
      .meta({ description: 'What a request naming no model gets: the default model and its defaults (null when there is no default model)' }),
    limits: limitsSchema,
  })
  .meta({ id: 'Models' });

export const schedulersSchema = z
  .object({
    schedulers: z.array(z.object({ name: z.string(), description: z.string(), models: z.array(z.string()), default_for: z.array(z.string()) })),
    default: z.string().nullable().meta({ description: "The default model's scheduler (null without a default model)" }),
    limits: limitsSchema,
  })
  .meta({ id: 'Schedulers' });

export const openAiErrorSchema = z
  .object({ error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string().nullable() }) })
  .meta({ id: 'OpenAIError' });

export const openAiImagesSchema = z
  .object({
    created: z.number().int(),
    data: z.array(z.union([z.object({ url: z.url() }), z.object({ b64_json: z.string() })])),
  })
  .meta({ id: 'OpenAIImagesResponse' });

const openAiModelSchema = z.object({ id: z.string(), object: z.literal('model'), created: z.number().int(), owned_by: z.string() }).meta({ id: 'OpenAIModel' });

export const openAiModelListSchema = z.object({ object: z.literal('list'), data: z.array(openAiModelSchema) }).meta({ id: 'OpenAIModelList' });
export { openAiModelSchema };

/** OpenAI-shaped error answers for the given statuses. */
export function openAiErrors(...statuses: number[]) {
  // Every /v1 route is behind the API key and its rate limit.
  return Object.fromEntries(
    [...new Set([401, 429, ...statuses])].map((s) => [
      s,
      { description: 'An error in OpenAI’s shape', content: { 'application/json': { schema: openAiErrorSchema } } },
    ]),
  );
}

/** The id path parameter of a job. */
export const jobIdParams = z.object({ id: z.string().meta({ description: 'The job id (a UUID)' }) });

/** The Idempotency-Key header, documented (the routes read and check it). */
export const idempotencyHeaders = z.looseObject({
  'idempotency-key': z
    .string()
    .regex(/^[\x21-\x7e]{1,255}$/)
    .optional()
    .meta({ description: 'Makes the submission safe to retry: the same key and body within 24 h give back the original job; another body gets 422' }),
});

/**
 * The job routes' schemas (src/api/app.ts). Requests are validated with the same zod objects
 * the service defines (src/core/params.ts).
 */
export function jobRouteSchemas(create: z.ZodType, list: z.ZodType, multipart?: z.ZodType) {
  return {
    create: {
      tags: ['jobs'],
      summary: 'Submit a job: text-to-image (JSON), or image-to-image and inpainting (multipart/form-data with the pictures)',
      headers: idempotencyHeaders,
      // Two representations of one request; src/api/openapi.ts documents each.
      body: multipart ? { content: { 'application/json': { schema: create }, 'multipart/form-data': { schema: multipart } } } : create,
      response: {
        201: {
          description: 'The job (also when an Idempotency-Key replays it: then Idempotent-Replayed: true)',
          content: { 'application/json': { schema: jobSchema } },
        },
        ...problems(400, 401, 413, 415, 422, 429, 503),
      },
    },
    list: {
      tags: ['jobs'],
      summary: 'Your jobs, newest first',
      querystring: list,
      response: { 200: jobListSchema, ...problems(400, 401, 429, 503) },
    },
    get: { tags: ['jobs'], summary: 'A job', params: jobIdParams, response: { 200: jobSchema, ...problems(401, 404, 429, 503) } },
    url: {
      tags: ['jobs'],
      summary: "A succeeded job's image URL(s)",
      params: jobIdParams,
      response: { 200: imageUrlSchema, ...problems(400, 401, 404, 429, 503) },
    },
    cancel: { tags: ['jobs'], summary: 'Cancel a job', params: jobIdParams, response: { 200: jobSchema, ...problems(401, 404, 409, 429, 503) } },
    delete: {
      tags: ['jobs'],
      summary: 'Delete a job: its images and prompts',
      params: jobIdParams,
      response: { 204: z.undefined().meta({ description: 'Deleted' }), ...problems(401, 404, 429, 503) },
    },
    healthz: { tags: ['health'], summary: 'The process is alive', response: { 200: z.object({ status: z.literal('ok') }) } },
    readyz: {
      tags: ['health'],
      summary: 'Postgres, Redis and storage are reachable',
      response: { 200: z.object({ status: z.literal('ready'), checks: z.record(z.string(), z.enum(['ok', 'down'])) }), ...problems(503) },
    },
  };
}

export const usageSchema = z
  .object({
    tenant: z.string(),
    day: z.string().meta({ description: 'The UTC day, YYYY-MM-DD' }),
    resets_at: isoTime,
    pixel_steps: z.object({ used: z.number().int(), limit: z.number().int().nullable(), remaining: z.number().int().nullable() }),
    in_flight: z.object({ used: z.number().int(), limit: z.number().int().nullable() }),
    jobs_today: z.number().int(),
  })
  .meta({ id: 'Usage' });
