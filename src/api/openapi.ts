import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance, FastifySchemaCompiler } from 'fastify';
import { createJsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';
import type { z } from 'zod';
import { ValidationError } from '../core/errors.js';
import { fieldErrors } from '../core/params.js';
import { packageVersion } from '../core/reporting.js';

/**
 * The API's contract, OpenAPI 3.1, generated from the zod schemas the routes validate requests
 * with (fastify-type-provider-zod's transform for @fastify/swagger): GET /openapi.json, and a
 * docs page at GET /docs (@fastify/swagger-ui). Tests validate the document and check every
 * response the API tests receive against it (tests/support/openapi.ts), so the two cannot drift.
 *
 * Requests are validated by the route's zod schema through our own compiler, which reports
 * failures as the API always has (400 problem+json naming each field and rule, input kept so a
 * wrongly typed field is not called missing). Responses are serialised as plain JSON: their
 * schemas document them, and the tests hold the API to them.
 */

/** Validates a request part with its zod schema; errors are the API's ValidationError. */
export const zodValidatorCompiler: FastifySchemaCompiler<z.ZodType> = ({ schema, httpPart }) => {
  // Headers are documented, and read by the routes that take them (idempotencyKeyOf names the
  // header in its errors as clients spell it).
  if (httpPart === 'headers') return (data: unknown) => ({ value: data });
  return (data: unknown) => {
    if (httpPart === 'body' && (typeof data !== 'object' || data === null || Array.isArray(data))) {
      return { error: new ValidationError([{ field: '(body)', rule: 'type', message: 'must be a JSON object' }]) };
    }
    // reportInput: zod 4 leaves `input` off issues otherwise, and fieldErrors would call every wrongly typed field "required".
    const result = schema.safeParse(data, { reportInput: true });
    return result.success ? { value: result.data } : { error: new ValidationError(fieldErrors(result.error)) };
  };
};

/**
 * fastify-type-provider-zod's transform, also for a body documented per content type
 * (`body: { content: { type: { schema } } }`, as POST /generated-images takes JSON or multipart):
 * each content type's zod schema is turned into JSON Schema on its own.
 */
function bodyPerContentType(inner: ReturnType<typeof createJsonSchemaTransform>): ReturnType<typeof createJsonSchemaTransform> {
  return (doc) => {
    const schema = doc.schema as { body?: { content?: Record<string, { schema: unknown }> } } | undefined;
    const content = schema?.body?.content;
    if (!content) return inner(doc);
    const out = inner({ ...doc, schema: { ...schema, body: undefined } }) as { schema: Record<string, unknown>; url: string };
    const converted: Record<string, { schema: unknown }> = {};
    for (const [type, { schema: part }] of Object.entries(content)) {
      converted[type] = { schema: (inner({ ...doc, schema: { body: part } }) as { schema: { body: unknown } }).schema.body };
    }
    return { ...out, schema: { ...out.schema, body: { content: converted } } };
  };
}

/** Plain JSON for responses (see above). */
export const jsonSerializerCompiler = () => (data: unknown) => JSON.stringify(data);

export interface OpenApiOptions {
  /** Paths left out of the document (the docs page's own assets). */
  hidden?: string[];
}

/** Registers the generator (call before any route), the docs page and GET /openapi.json. */
export function registerOpenApi(app: FastifyInstance, opts: OpenApiOptions = {}): void {
  app.setValidatorCompiler(zodValidatorCompiler);
  app.setSerializerCompiler(jsonSerializerCompiler);
  void app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 't2i',
        version: packageVersion(),
        description:
          'Text-to-image, image-to-image and inpainting jobs on a fleet of Stable Diffusion workers, one model each: submit (naming a model, or the default), follow live (SSE or WebSocket), fetch the images, get a signed webhook; and the OpenAI Images API. Errors are application/problem+json (RFC 9457), except under /v1, which answers in OpenAI’s error shape.',
      },
      tags: [
        { name: 'jobs', description: 'Submit, read, list and cancel jobs' },
        { name: 'events', description: 'Live progress: Server-Sent Events and WebSocket' },
        { name: 'webhooks', description: 'Webhook deliveries of a job' },
        { name: 'openai', description: 'The OpenAI Images API' },
        { name: 'discovery', description: 'What the fleet serves' },
        { name: 'health', description: 'Liveness and readiness' },
      ],
    },
    transform: bodyPerContentType(createJsonSchemaTransform({ skipList: ['/docs', '/docs/*', '/docs/static/*', '/openapi.json', ...(opts.hidden ?? [])] })),
    transformObject: jsonSchemaTransformObject,
  });
  void app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { deepLinking: true } });
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
