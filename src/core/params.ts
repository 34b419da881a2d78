import { z } from 'zod';
import { MAX_SEED } from '../engine/random.js';
import { SCHEDULER_NAMES } from '../engine/schedulers/types.js';
import type { FieldError } from './errors.js';

/**
 * What a client may ask for, in the textbook's snake_case. Strict: unknown fields are
 * rejected, and numbers must be JSON numbers (no "50" strings coerced behind the client's back).
 */

export const LIMITS = {
  promptMaxChars: 2000,
  maxSteps: 50,
  minSide: 64,
  maxSide: 1024,
  maxGuidance: 30,
} as const;

const side = z
  .number()
  .int()
  .min(LIMITS.minSide)
  .max(LIMITS.maxSide)
  .refine((v) => v % 8 === 0, { message: 'must be a multiple of 8', params: { rule: 'multiple_of' } });

export const createImageBody = z.strictObject({
  prompt: z
    .string()
    .max(LIMITS.promptMaxChars)
    .refine((s) => s.trim().length > 0, { message: 'must not be empty', params: { rule: 'non_empty' } }),
  negative_prompt: z.string().max(LIMITS.promptMaxChars).nullable().default(null),
  num_steps: z.number().int().min(1).max(LIMITS.maxSteps).default(50),
  guidance_scale: z.number().min(0).max(LIMITS.maxGuidance).default(9),
  seed: z.number().int().min(0).max(MAX_SEED).nullable().default(null),
  width: side.default(512),
  height: side.default(512),
  scheduler: z.enum(SCHEDULER_NAMES).default('pndm'),
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
