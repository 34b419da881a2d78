/**
 * The web page's form checks (web/src/validate.ts) against the API's own schema
 * (src/core/params.ts createImageBody): for the same input, the same fields, rules and messages,
 * and the same body when it passes. The page's limits come from GET /models, which reads them
 * from the same constants the schema uses; here they are built the same way.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { createImageBody, fieldErrors } from '../../src/core/params.js';
import { SCHEDULER_NAMES } from '../../src/engine/schedulers/types.js';
import { requestLimits } from '../../src/api/discovery.js';
import { randomSeed, validateForm, type FormValues, type Limits } from '../../web/src/validate.js';

/** The limits the API lists (GET /models), with a MAX_PIXEL_STEPS of 52,428,800. */
const LIMITS: Limits = requestLimits(52_428_800);

const VALID: FormValues = {
  prompt: 'a red circle',
  negative_prompt: '',
  num_steps: '20',
  guidance_scale: '7.5',
  width: '512',
  height: '512',
  seed: '',
  scheduler: 'pndm',
  num_images: '1',
};

/** What the API answers for the body the form would send (numbers as numbers, an empty seed left out). */
function apiErrors(v: FormValues) {
  const num = (s: string) => (s.trim() === '' ? undefined : Number(s));
  const body: Record<string, unknown> = {
    prompt: v.prompt,
    negative_prompt: v.negative_prompt === '' ? null : v.negative_prompt,
    num_steps: num(v.num_steps),
    guidance_scale: num(v.guidance_scale),
    width: num(v.width),
    height: num(v.height),
    scheduler: v.scheduler,
    num_images: num(v.num_images),
    ...(v.seed.trim() === '' ? {} : { seed: num(v.seed) }),
  };
  const r = createImageBody.safeParse(body, { reportInput: true });
  return r.success ? { data: r.data, errors: [] } : { errors: fieldErrors(r.error) };
}

function page(v: FormValues) {
  return validateForm(v, LIMITS, SCHEDULER_NAMES);
}

/** An empty number box means "required" to the page, while the API would fill its default: those inputs are not compared. */
const numberText = fc.oneof(
  fc.integer({ min: -10, max: 5000 }).map(String),
  fc.double({ min: -5, max: 200, noNaN: true, noDefaultInfinity: true }).map(String),
  fc.constantFrom('0', '1', '8', '63', '64', '65', '72', '150', '151', '2048', '2049', '2056', '4294967295', '4294967296', '-1', '7.5', '30', '30.5'),
);

describe('the web form checks a request as the API does', () => {
  it('passes a valid form, with the body the API would take', () => {
    const r = page({ ...VALID, seed: '42', negative_prompt: 'blurry' });
    expect(r.errors).toEqual([]);
    const api = apiErrors({ ...VALID, seed: '42', negative_prompt: 'blurry' });
    // Every field the API fills in, but those the form does not check: the webhook (none on the
    // page), the model (its select, added as the request is sent: web/src/form.ts) and strength
    // (image-to-image, not on the page).
    expect(r.body).toEqual({ ...api.data, webhook_url: undefined, model: undefined, strength: undefined, ...r.body });
    expect(api.data).toMatchObject(r.body!);
  });

  it.each([
    ['an empty prompt', { prompt: '' }],
    ['a blank prompt', { prompt: '  \n ' }],
    ['a prompt with a control character', { prompt: 'a\u0007b' }],
    ['a prompt with a lone surrogate', { prompt: 'a\ud800b' }],
    ['a prompt over the limit', { prompt: 'é'.repeat(2001) }],
    ['a prompt of 2000 emoji (code points, not UTF-16 units)', { prompt: '🎨'.repeat(2000) }],
    ['a negative prompt with a control character', { negative_prompt: '\u0000' }],
    ['a width not a multiple of 8', { width: '100' }],
    ['a width too small and not a multiple of 8', { width: '60' }],
    ['a height too large', { height: '4096' }],
    ['fractional steps', { num_steps: '7.5' }],
    ['steps 0', { num_steps: '0' }],
    ['guidance over 30', { guidance_scale: '31' }],
    ['negative guidance', { guidance_scale: '-1' }],
    ['a seed over 2^32 - 1', { seed: '4294967296' }],
    ['a fractional seed', { seed: '1.5' }],
    ['5 images', { num_images: '5' }],
    ['an unknown scheduler', { scheduler: 'karras' }],
  ])('%s: the same errors as the API', (_name, change) => {
    const v = { ...VALID, ...change };
    const mine = page(v);
    expect(mine.errors).toEqual(apiErrors(v).errors);
    expect(mine.body === undefined).toBe(apiErrors(v).errors.length > 0);
  });

  it('the same errors as the API for any numbers in the number fields', () => {
    fc.assert(
      fc.property(
        fc.record({ num_steps: numberText, guidance_scale: numberText, width: numberText, height: numberText, seed: numberText, num_images: numberText }),
        (change) => {
          const v = { ...VALID, ...change };
          expect(page(v).errors).toEqual(apiErrors(v).errors);
        },
      ),
      { numRuns: 500 },
    );
  });

  it('the same errors as the API for any prompt text', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 40 }), fc.string({ unit: 'grapheme', maxLength: 40 }), (prompt, negative) => {
        const v = { ...VALID, prompt, negative_prompt: negative };
        expect(page(v).errors).toEqual(apiErrors(v).errors);
      }),
      { numRuns: 500 },
    );
  });

  it('says what the page alone knows: an empty number box is required, a non-number is not a number', () => {
    expect(page({ ...VALID, num_steps: '' }).errors).toEqual([{ field: 'num_steps', rule: 'required', message: 'is required' }]);
    expect(page({ ...VALID, width: 'abc' }).errors).toEqual([{ field: 'width', rule: 'type', message: 'must be a number' }]);
  });

  it('rolls seeds the API takes', () => {
    for (let i = 0; i < 100; i++) expect(apiErrors({ ...VALID, seed: String(randomSeed()) }).errors).toEqual([]);
  });
});
