/**
 * The API's contract (issue 12, test 3): the OpenAPI document a real `t2i api` serves is valid
 * OpenAPI 3.1, names every route the app has, and its docs page loads. (Each API test file then
 * checks every answer it receives against this document: tests/support/openapi.ts.)
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { startApiProcess, type ServiceProcess } from '../support/processes.js';
import { documentErrors } from '../support/openapi.js';
import { isolatedConfig } from '../support/system.js';

let config: Config;
let proc: ServiceProcess | undefined;
let url = '';

beforeAll(async () => {
  config = await isolatedConfig();
  ({ proc, url } = await startApiProcess(config));
});

afterAll(async () => {
  await proc?.stop();
});

interface Doc {
  openapi: string;
  paths: Record<string, Record<string, { tags?: string[]; responses?: Record<string, unknown>; requestBody?: unknown }>>;
  components: { schemas: Record<string, unknown> };
}

describe('GET /openapi.json', () => {
  let doc: Doc;

  beforeAll(async () => {
    const res = await fetch(`${url}/openapi.json`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/json/);
    doc = (await res.json()) as Doc;
  });

  it('is valid OpenAPI 3.1', async () => {
    expect(doc.openapi).toBe('3.1.0');
    expect(await documentErrors(doc)).toEqual([]);
  });

  it('documents every route, with its request schema and its answers', () => {
    const operations = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`));
    expect(operations.sort()).toEqual(
      [
        'POST /generated-images',
        'GET /generated-images',
        'GET /generated-images/{id}',
        'DELETE /generated-images/{id}',
        'GET /generated-images/{id}/url',
        'POST /generated-images/{id}/cancel',
        'GET /generated-images/{id}/events',
        'GET /generated-images/{id}/webhook-deliveries',
        'GET /events',
        'GET /usage',
        'POST /v1/images/generations',
        'GET /v1/models',
        'GET /v1/models/{model}',
        'GET /models',
        'GET /schedulers',
        'GET /generated-images/{id}/images/{index}',
        'GET /generated-images/{id}/images/{index}/thumbnail',
        'GET /healthz',
        'GET /readyz',
      ].sort(),
    );
    for (const [path, ops] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        expect(op.tags?.length, `${method} ${path} has a tag`).toBeGreaterThan(0);
        expect(
          Object.keys(op.responses ?? {}).some((s) => s.startsWith('2') || s === '101'),
          `${method} ${path} documents its success`,
        ).toBe(true);
      }
    }
    // The request bodies are the zod schemas that validate them: their rules are in the document.
    const create = doc.paths['/generated-images']!.post!.requestBody as {
      content: Record<string, { schema: { properties: Record<string, Record<string, unknown>>; required: string[] } }>;
    };
    const body = create.content['application/json']!.schema;
    expect(body.required).toEqual(['prompt']);
    // No fixed default: a request that leaves it out gets its model's.
    expect(body.properties.num_steps).toMatchObject({
      type: 'integer',
      minimum: 1,
      maximum: 150,
      description: expect.stringContaining("the model's own") as unknown,
    });
    expect(body.properties.num_steps).not.toHaveProperty('default');
    expect(body.properties.model).toMatchObject({ anyOf: [{ type: 'string', pattern: expect.any(String) as unknown }, { type: 'null' }] });
    expect(body.properties.strength).toMatchObject({ anyOf: [{ type: 'number', minimum: 0, maximum: 1 }, { type: 'null' }] });
    // Image-to-image and inpainting: the same route as multipart/form-data, the request as JSON beside the files.
    const form = create.content['multipart/form-data']!.schema;
    expect(form.required).toEqual(['request']);
    expect(Object.keys(form.properties).sort()).toEqual(['image', 'mask', 'request']);
    expect(form.properties.image).toMatchObject({ type: 'string', contentMediaType: 'application/octet-stream' });
    expect(body.properties.num_images).toMatchObject({ minimum: 1, maximum: 4, default: 1 });
    expect(body.properties.scheduler).toMatchObject({ enum: ['pndm', 'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m', 'lcm'] });
    expect(Object.keys(doc.components.schemas)).toEqual(expect.arrayContaining(['Job', 'Problem', 'OpenAIError', 'WebhookDeliveries']));
  });
});

describe('GET /docs', () => {
  it('serves the docs page, which loads the document', async () => {
    const res = await fetch(`${url}/docs`, { redirect: 'follow' });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await res.text();
    expect(html).toMatch(/swagger-ui/i);
    const init = await fetch(`${url}/docs/static/swagger-initializer.js`);
    expect(init.status).toBe(200);
    expect(await (await fetch(`${url}/docs/json`)).json()).toMatchObject({ openapi: '3.1.0' });
  });
});
