import multipart from '@fastify/multipart';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { ProblemError, ValidationError } from '../core/errors.js';
import { createImageBody, fieldErrors, type CreateImageBody } from '../core/params.js';
import type { InputPicture } from '../core/submission.js';
import { probePicture } from '../core/uploads.js';

/**
 * Image-to-image and inpainting on POST /generated-images: the same route, as
 * multipart/form-data with a `request` part (the JSON body of a text-to-image request) and the
 * files `image` and, for inpainting, `mask`:
 *
 *   curl -F 'request={"prompt": "an oil painting", "strength": 0.6}' -F image=@photo.png ...
 *
 * Why multipart and not a presigned upload URL: the pictures are checked while the client waits
 * (format, decodability, size against the request, the mask against the picture), so every
 * mistake is a 400 naming its field in the same answer, never a job that fails later; the API
 * bounds each file (MAX_UPLOAD_BYTES) as it streams in, where a presigned S3 PUT cannot bound
 * its size; the job and its pictures are created in one request (one Idempotency-Key), and the
 * pictures are stored under the job's tenant by the API, so no client ever names a storage key.
 * The cost is that the bytes pass through the API once; uploads are a few MB at most.
 */

export interface UploadLimits {
  /** MAX_UPLOAD_BYTES: per file. */
  maxFileBytes: number;
  /** BODY_LIMIT_BYTES: the `request` part, as a JSON body. */
  maxRequestBytes: number;
}

/** A file part as the multipart parser hands it over (its bytes). */
const file = z
  .custom<Buffer>((v) => Buffer.isBuffer(v), { message: 'must be a file part' })
  .meta({ type: 'string', contentMediaType: 'application/octet-stream', description: 'A PNG, JPEG or WebP file' });

/** The multipart form, as documented and validated (the `request` part is then checked as a JSON body). */
export const multipartCreateBody = z.strictObject({
  request: z
    .union([z.string(), z.record(z.string(), z.unknown())])
    .meta({ description: 'The JSON body of a text-to-image request (prompt, model, strength, ...), as text or an application/json part' }),
  image: file.optional().meta({ description: 'Image-to-image and inpainting: the picture (PNG, JPEG or WebP), the size of the output' }),
  mask: file.optional().meta({ description: 'Inpainting: white where to paint, black where to keep; the size of the image' }),
});

/**
 * Registers multipart parsing for the routes of `scope` (only the create route's plugin): the
 * form is read into `request.body` as { request, image?, mask? } before validation, each file
 * bounded as it streams in; any fault of the form is a 4xx naming the part where it can.
 */
export async function registerUploads(scope: FastifyInstance, limits: UploadLimits): Promise<void> {
  await scope.register(multipart, {
    limits: {
      fileSize: limits.maxFileBytes,
      files: 2,
      fields: 1,
      // One byte over the limit tells a value that was cut short from one that fits.
      fieldSize: limits.maxRequestBytes + 1,
      parts: 3,
      headerPairs: 50,
    },
  });
  scope.addHook('preValidation', async (request) => {
    if (!request.isMultipart()) return;
    const form: Record<string, unknown> = {};
    try {
      for await (const part of request.parts()) {
        if (part.fieldname in form) {
          throw new ValidationError([{ field: part.fieldname, rule: 'parts', message: 'is sent twice; send each part once' }]);
        }
        if (part.type === 'file') form[part.fieldname] = await part.toBuffer();
        else if (part.valueTruncated) throw requestTooLarge(limits);
        else form[part.fieldname] = part.value;
      }
    } catch (err) {
      if (err instanceof ProblemError) throw err;
      // Everything else here is the form's fault (limits, a cut-off or malformed body).
      throw multipartProblem(err as MultipartError, limits);
    }
    request.body = form;
  });
}

function requestTooLarge(limits: UploadLimits): ProblemError {
  return new ProblemError(413, 'Payload Too Large', `request: the part is larger than ${limits.maxRequestBytes} bytes.`, {
    errors: [{ field: 'request', rule: 'max_bytes', message: `must be at most ${limits.maxRequestBytes} bytes` }],
  });
}

/** The request's body and pictures, from a JSON body or a multipart form. */
export async function submissionOf(
  request: FastifyRequest,
  limits: UploadLimits,
): Promise<{ body: CreateImageBody; inputs?: { image?: InputPicture; mask?: InputPicture } }> {
  if (!request.isMultipart()) return { body: request.body as CreateImageBody };
  const form = request.body as z.infer<typeof multipartCreateBody>;
  let json: unknown = form.request;
  if (typeof json === 'string') {
    if (Buffer.byteLength(json) > limits.maxRequestBytes) throw requestTooLarge(limits);
    try {
      json = JSON.parse(json);
    } catch (err) {
      throw new ValidationError([{ field: 'request', rule: 'json', message: `is not valid JSON: ${(err as Error).message}` }]);
    }
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new ValidationError([{ field: 'request', rule: 'type', message: 'must be a JSON object' }]);
  }
  const parsed = createImageBody.safeParse(json, { reportInput: true });
  const [image, mask] = await Promise.allSettled([form.image && probePicture(form.image, 'image'), form.mask && probePicture(form.mask, 'mask')]);
  // Every field's problem in one answer: the body's and both files'.
  const errors = [
    ...(parsed.success ? [] : fieldErrors(parsed.error)),
    ...[image, mask].flatMap((r) => (r.status === 'rejected' ? (r.reason instanceof ValidationError ? r.reason.errors : rethrow(r.reason)) : [])),
  ];
  if (errors.length > 0) throw new ValidationError(errors);
  const picture = (r: PromiseSettledResult<InputPicture | undefined>) => (r.status === 'fulfilled' ? r.value : undefined);
  const inputs = { ...(picture(image) ? { image: picture(image)! } : {}), ...(picture(mask) ? { mask: picture(mask)! } : {}) };
  return { body: parsed.data!, inputs };
}

function rethrow(err: unknown): never {
  throw err;
}

interface MultipartError {
  code?: string;
  part?: { fieldname?: string };
}

/** The multipart parser's errors as the API's problems, naming the part where it can. */
function multipartProblem(err: MultipartError, limits: UploadLimits): ProblemError {
  switch (err.code) {
    case 'FST_REQ_FILE_TOO_LARGE': {
      const field = err.part?.fieldname ?? '(body)';
      const max = limits.maxFileBytes.toLocaleString('en-US');
      return new ProblemError(413, 'Payload Too Large', `${field}: the file is larger than ${max} bytes.`, {
        errors: [{ field, rule: 'max_bytes', message: `must be at most ${max} bytes` }],
      });
    }
    case 'FST_FILES_LIMIT':
    case 'FST_FIELDS_LIMIT':
    case 'FST_PARTS_LIMIT':
      return new ValidationError([{ field: '(body)', rule: 'parts', message: 'must have at most the parts request, image and mask' }]);
    case 'FST_PROTO_VIOLATION':
      return new ValidationError([{ field: '(body)', rule: 'unknown_field', message: 'has a part whose name is not allowed' }]);
    case 'FST_INVALID_JSON_FIELD_ERROR':
      return new ValidationError([{ field: 'request', rule: 'json', message: 'is declared application/json but is not valid JSON' }]);
    default:
      return new ValidationError([{ field: '(body)', rule: 'multipart', message: 'is not a complete, well-formed multipart/form-data body' }]);
  }
}
