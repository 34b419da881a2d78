import { z } from 'zod';
import { GENERATION_LIMITS, MAX_IMAGES } from '../engine/pipeline.js';

export { MAX_IMAGES };
import { MAX_SEED } from '../engine/random.js';
import { SCHEDULER_NAMES } from '../engine/schedulers/types.js';
import type { FieldError } from './errors.js';
import { MODEL_NAME_PATTERN } from './jobs.js';
import { MAX_WEBHOOK_URL_LENGTH } from './ssrf.js';

/**
 * What a client may ask for, in the textbook's snake_case. Strict: unknown fields are
 * rejected, and numbers must be JSON numbers (no "50" strings coerced behind the client's back).
 * Limits are the engine's (GENERATION_LIMITS), defined once. Steps, guidance, size, scheduler and
 * strength left out are the model's own defaults, filled in when the job is created
 * (src/core/job-params.ts), not one set of numbers for every model.
 */

const LIMITS = GENERATION_LIMITS;

/**
 * What a prompt may contain: any Unicode text up to maxPromptChars code points, except
 *  - lone surrogates (U+D800–U+DFFF without their pair): not Unicode text, and UTF-8 (Postgres,
 *    the tokenizer) cannot carry them, so they would be silently replaced;
 *  - control characters other than tab, line feed and carriage return (U+0000–U+001F, U+007F–U+009F):
 *    Postgres text cannot hold U+0000, and the others are never part of a description.
 */
// eslint-disable-next-line no-control-regex -- matching control characters is the point of this pattern
const CONTROL = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]/;
/** With the u flag a surrogate pair is one code point, so \p{Cs} matches only unpaired halves. */
const LONE_SURROGATE = /\p{Cs}/u;

function promptText() {
  return z
    .string()
    .refine((s) => !LONE_SURROGATE.test(s), { message: 'must be valid Unicode text (it contains an unpaired surrogate)', params: { rule: 'unicode' } })
    .refine((s) => !CONTROL.test(s), {
      message: 'must not contain control characters other than tab, line feed and carriage return',
      params: { rule: 'no_control_characters' },
    })
    .refine((s) => codePoints(s) <= LIMITS.maxPromptChars, { message: `must be at most ${LIMITS.maxPromptChars} characters`, params: { rule: 'max' } });
}

function codePoints(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

const side = z
  .number()
  .int()
  .min(LIMITS.minSide)
  .max(LIMITS.maxSide)
  .refine((v) => v % 8 === 0, { message: 'must be a multiple of 8', params: { rule: 'multiple_of' } });

/** How the document describes a parameter whose default is the model's. */
const MODEL_DEFAULT = "Default: the model's own (GET /models, model_defaults)";

export const createImageBody = z.strictObject({
  prompt: promptText().refine((s) => s.trim().length > 0, { message: 'must not be empty', params: { rule: 'non_empty' } }),
  negative_prompt: promptText().nullable().default(null),
  /** Which model runs the job (GET /models lists them); the default model when absent. */
  model: z.string().regex(MODEL_NAME_PATTERN, 'must be a model name: letters, digits, ".", "_" and "-", at most 64').nullable().default(null),
  num_steps: z.number().int().min(1).max(LIMITS.maxSteps).optional().meta({ description: MODEL_DEFAULT }),
  guidance_scale: z.number().min(0).max(LIMITS.maxGuidance).optional().meta({ description: MODEL_DEFAULT }),
  seed: z.number().int().min(0).max(MAX_SEED).nullable().default(null),
  width: side.optional().meta({ description: `${MODEL_DEFAULT}; with an input picture, its width` }),
  height: side.optional().meta({ description: `${MODEL_DEFAULT}; with an input picture, its height` }),
  scheduler: z.enum(SCHEDULER_NAMES).optional().meta({ description: MODEL_DEFAULT }),
  /** Image-to-image: how much of the input picture is redrawn, 0 (none) to 1 (from noise); needs an image. */
  strength: z.number().min(0).max(1).nullable().default(null),
  /** Images from one request, 1..4: image k has seed + k (mod 2^32), each its own generation, batched as the engine allows (src/engine/several-images.ts). */
  num_images: z.number().int().min(1).max(MAX_IMAGES).default(1),
  /** Where the outcome is POSTed, signed (Standard Webhooks). Checked against SSRF here and again when sent. */
  webhook_url: z
    .string()
    .max(MAX_WEBHOOK_URL_LENGTH, { message: `must be at most ${MAX_WEBHOOK_URL_LENGTH} characters` })
    .nullable()
    .default(null),
});

export type CreateImageBody = z.infer<typeof createImageBody>;

export const listQuery = z.strictObject({
  limit: z.string().regex(/^\d+$/, 'must be a whole number').transform(Number).pipe(z.number().int().min(1).max(100)).default(20),
  cursor: z.string().max(200).optional(),
});

/** zod issues as the API's field errors: which field, which rule, and a sentence. */
export function fieldErrors(error: z.ZodError): FieldError[] {
  return error.issues.flatMap((issue): FieldError[] => {
    if (issue.code === 'unrecognized_keys') {
      return issue.keys.map((key) => ({ field: [...issue.path, key].join('.'), rule: 'unknown_field', message: 'is not a known field' }));
    }
    const field = issue.path.join('.') || '(body)';
    switch (issue.code) {
      case 'invalid_type':
        return [
          issue.input === undefined
            ? { field, rule: 'required', message: 'is required' }
            : { field, rule: 'type', message: `must be ${article(issue.expected)}, got ${describe(issue.input)}` },
        ];
      case 'too_small':
        return [
          { field, rule: 'min', message: issue.origin === 'string' ? `must be at least ${issue.minimum} characters` : `must be at least ${issue.minimum}` },
        ];
      case 'too_big':
        return [
          { field, rule: 'max', message: issue.origin === 'string' ? `must be at most ${issue.maximum} characters` : `must be at most ${issue.maximum}` },
        ];
      case 'invalid_value':
        return [{ field, rule: 'enum', message: `must be one of ${issue.values.map(String).join(', ')}` }];
      case 'custom':
        return [{ field, rule: String(issue.params?.rule ?? 'custom'), message: issue.message }];
      case 'invalid_format':
        return [{ field, rule: 'format', message: issue.message }];
      default:
        return [{ field, rule: issue.code, message: issue.message }];
    }
  });
}

function article(expected: string): string {
  if (expected === 'int') return 'an integer';
  return /^[aeiou]/.test(expected) ? `an ${expected}` : `a ${expected}`;
}

function describe(input: unknown): string {
  if (input === null) return 'null';
  if (Array.isArray(input)) return 'an array';
  if (typeof input === 'number' && !Number.isInteger(input)) return 'a fractional number';
  return typeof input === 'object' ? 'an object' : `a ${typeof input}`;
}
