import { createHash } from 'node:crypto';
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import type { ImagesService } from '../core/images.js';
import { MAX_IMAGES } from '../core/params.js';
import { jobIdParams, problems } from './schemas.js';
import { holds } from './web.js';

/**
 * A succeeded job's images through the API itself, behind the key like every job route:
 *
 *   GET /generated-images/{id}/images/{index}             the PNG
 *   GET /generated-images/{id}/images/{index}/thumbnail   a WebP of at most 256 px (the gallery's)
 *
 * The presigned URLs of /url point at the storage host, which the web page may not reach: its
 * content-security policy allows requests to its own origin only. Answers are `private,
 * no-cache` with an ETag: the browser keeps the bytes but asks again every time, so the key and
 * tenant are checked on each use (a cache entry is not keyed by the Authorization header), and an
 * unchanged image costs a 304 without a read from storage.
 */

export interface ImageFileRoutesOptions {
  images: Pick<ImagesService, 'imageObject'>;
  tenantOf(request: FastifyRequest): string;
  /** The stored object's bytes (src/adapters/storage.ts read). */
  read(key: string): Promise<Buffer>;
  /** A small WebP of a PNG (src/adapters/thumbnails.ts). */
  thumbnail(png: Buffer): Promise<Buffer>;
}

const params = jobIdParams.extend({
  index: z
    .string()
    .regex(/^\d{1,2}$/, 'must be a whole number')
    .transform(Number)
    .pipe(
      z
        .number()
        .int()
        .max(MAX_IMAGES - 1),
    )
    .meta({ description: 'Which image of the job: 0 for the first (seed), k for seed + k' }),
});

const binary = (type: string, description: string) => ({ description, content: { [type]: { schema: z.string().meta({ description }) } } });

function schema(summary: string, type: string) {
  return {
    tags: ['jobs'],
    summary,
    params,
    response: {
      200: binary(type, summary),
      304: z.undefined().meta({ description: 'Not Modified: the copy the client holds (If-None-Match) is current' }),
      ...problems(400, 401, 404, 429, 503),
    },
  };
}

export const imageFileRoutes: FastifyPluginAsync<ImageFileRoutesOptions> = async (app, opts) => {
  type Req = FastifyRequest<{ Params: { id: string; index: number } }>;

  /** Answers 304 when the client holds this version; otherwise sends what `body` makes. */
  const serve = async (request: Req, reply: FastifyReply, variant: string, type: string, body: (png: Buffer) => Promise<Buffer>) => {
    const { id, index } = request.params;
    const { key } = await opts.images.imageObject(opts.tenantOf(request), id, index);
    // The object key names the attempt that won: a job's image never changes under it.
    const etag = `"${createHash('sha256').update(`${key}\n${variant}`).digest('base64url').slice(0, 27)}"`;
    reply.header('cache-control', 'private, no-cache').header('vary', 'authorization').header('etag', etag);
    if (holds(request, etag)) return reply.status(304).send();
    const bytes = await body(await opts.read(key));
    reply.header('content-type', type);
    if (variant === 'png') reply.header('content-disposition', `inline; filename="t2i-${id}-${index}.png"`);
    return reply.send(bytes);
  };

  app.get('/generated-images/:id/images/:index', { schema: schema("A succeeded job's image (PNG)", 'image/png') }, (request, reply) =>
    serve(request as Req, reply, 'png', 'image/png', async (png) => png),
  );

  app.get('/generated-images/:id/images/:index/thumbnail', { schema: schema("A small WebP of a succeeded job's image", 'image/webp') }, (request, reply) =>
    serve(request as Req, reply, 'thumbnail', 'image/webp', (png) => opts.thumbnail(png)),
  );
};
