/**
 * The form's checks: the rules of POST /generated-images (src/core/params.ts) with the API's own
 * messages, so a person sees at once, next to the field, what the API would answer.
 * tests/unit/web-validate.test.ts holds the two together: for many inputs, these errors are the
 * API schema's errors. The limits are the API's (GET /models), not copies.
 *
 * One rule stays with the API: the pixel-steps budget per request (width x height x num_steps),
 * whose message the page shows as the API words it.
 *
 * No imports: this file is compiled for the browser and read by the Node tests alike.
 */

/** GET /models `limits`. */
export interface Limits {
  min_steps: number;
  max_steps: number;
  min_side: number;
  max_side: number;
  side_multiple_of: number;
  max_guidance_scale: number;
  max_prompt_chars: number;
  max_images: number;
  max_pixel_steps: number;
}

/** One failed rule of one field, as the API's problem+json `errors` items. */
export interface FieldError {
  field: string;
  rule: string;
  message: string;
}

/** The form's values as typed (inputs hold text). */
export interface FormValues {
  prompt: string;
  negative_prompt: string;
  num_steps: string;
  guidance_scale: string;
  width: string;
  height: string;
  seed: string;
  scheduler: string;
  num_images: string;
}

/** The request body the form sends. */
export interface CreateBody {
  prompt: string;
  negative_prompt: string | null;
  num_steps: number;
  guidance_scale: number;
  width: number;
  height: number;
  seed: number | null;
  scheduler: string;
  num_images: number;
}

/** seed is 0..2^32 - 1 (the engine's numpy-compatible generator takes 32 bits). */
export const MAX_SEED = 4294967295;

// The API's patterns (src/core/params.ts): control characters other than tab, LF and CR, and
// unpaired surrogates (with the u flag, \p{Cs} matches only halves without their pair).
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const CONTROL = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]/;
const LONE_SURROGATE = /\p{Cs}/u;

function codePoints(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

function promptErrors(field: string, text: string, limits: Limits, required: boolean): FieldError[] {
  const out: FieldError[] = [];
  if (LONE_SURROGATE.test(text)) out.push({ field, rule: 'unicode', message: 'must be valid Unicode text (it contains an unpaired surrogate)' });
  if (CONTROL.test(text))
    out.push({ field, rule: 'no_control_characters', message: 'must not contain control characters other than tab, line feed and carriage return' });
  if (codePoints(text) > limits.max_prompt_chars) out.push({ field, rule: 'max', message: `must be at most ${limits.max_prompt_chars} characters` });
  if (required && text.trim().length === 0) out.push({ field, rule: 'non_empty', message: 'must not be empty' });
  return out;
}

interface NumberRule {
  integer: boolean;
  min: number;
  max: number;
  multipleOf?: number;
}

/** A number field: its value, or its errors in the order the API's schema reports them. */
function numberField(field: string, raw: string, rule: NumberRule, errors: FieldError[]): number | undefined {
  const text = raw.trim();
  if (text === '') {
    errors.push({ field, rule: 'required', message: 'is required' });
    return undefined;
  }
  const value = Number(text);
  if (!Number.isFinite(value)) {
    errors.push({ field, rule: 'type', message: 'must be a number' });
    return undefined;
  }
  // Like the API's schema, a fraction where an integer is wanted says only that.
  if (rule.integer && !Number.isInteger(value)) {
    errors.push({ field, rule: 'type', message: 'must be an integer, got a fractional number' });
    return undefined;
  }
  const before = errors.length;
  if (value < rule.min) errors.push({ field, rule: 'min', message: `must be at least ${rule.min}` });
  if (value > rule.max) errors.push({ field, rule: 'max', message: `must be at most ${rule.max}` });
  if (rule.multipleOf !== undefined && value % rule.multipleOf !== 0)
    errors.push({ field, rule: 'multiple_of', message: `must be a multiple of ${rule.multipleOf}` });
  return errors.length === before ? value : undefined;
}

/**
 * Checks the form as the API would. `schedulers` are the names the API takes. Returns the body
 * to send when nothing failed.
 */
export function validateForm(v: FormValues, limits: Limits, schedulers: readonly string[]): { body?: CreateBody; errors: FieldError[] } {
  const errors: FieldError[] = [...promptErrors('prompt', v.prompt, limits, true), ...promptErrors('negative_prompt', v.negative_prompt, limits, false)];
  const side: NumberRule = { integer: true, min: limits.min_side, max: limits.max_side, multipleOf: limits.side_multiple_of };
  const num_steps = numberField('num_steps', v.num_steps, { integer: true, min: limits.min_steps, max: limits.max_steps }, errors);
  const guidance_scale = numberField('guidance_scale', v.guidance_scale, { integer: false, min: 0, max: limits.max_guidance_scale }, errors);
  // An empty seed is a random one, which the API picks and reports. (Fields in the API schema's order, as its errors come.)
  const seed = v.seed.trim() === '' ? null : numberField('seed', v.seed, { integer: true, min: 0, max: MAX_SEED }, errors);
  const width = numberField('width', v.width, side, errors);
  const height = numberField('height', v.height, side, errors);
  const num_images = numberField('num_images', v.num_images, { integer: true, min: 1, max: limits.max_images }, errors);
  if (!schedulers.includes(v.scheduler)) errors.push({ field: 'scheduler', rule: 'enum', message: `must be one of ${schedulers.join(', ')}` });
  if (errors.length > 0) return { errors };
  return {
    errors,
    body: {
      prompt: v.prompt,
      // The API's "no negative prompt" is null; an empty box means none.
      negative_prompt: v.negative_prompt === '' ? null : v.negative_prompt,
      num_steps: num_steps!,
      guidance_scale: guidance_scale!,
      width: width!,
      height: height!,
      seed: seed ?? null,
      scheduler: v.scheduler,
      num_images: num_images!,
    },
  };
}

/** A random seed, as the dice button rolls it: any of the 2^32. */
export function randomSeed(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0]!;
}
