/**
 * A request's parameters against its model (src/core/job-params.ts) and the choice of model
 * (src/core/models.ts), with the profiles workers announce for each variant: what a request
 * leaves out is the model's default, and what the model cannot do is a 400 naming the field.
 */
import { describe, expect, it } from 'vitest';
import { ValidationError, type FieldError } from '../../src/core/errors.js';
import type { FleetMember, ModelProfile } from '../../src/core/fleet.js';
import { jobParams } from '../../src/core/job-params.js';
import { ModelCatalog } from '../../src/core/models.js';
import { createImageBody } from '../../src/core/params.js';
import { SCHEDULER_NAMES } from '../../src/engine/schedulers/types.js';

/** Profiles as workers announce them (src/worker/main.ts) for the defaults src/engine/variant.ts finds. */
const SDXL: ModelProfile = {
  model: 'sdxl',
  variant: 'SDXL',
  defaults: { num_steps: 50, guidance_scale: 5, width: 1024, height: 1024, scheduler: 'euler', strength: 0.3 },
  schedulers: SCHEDULER_NAMES,
  tasks: ['text-to-image', 'image-to-image'],
};
const TURBO: ModelProfile = {
  model: 'sdxl-turbo',
  variant: 'SDXL Turbo',
  defaults: { num_steps: 1, guidance_scale: 0, width: 512, height: 512, scheduler: 'euler_ancestral', strength: 0.3 },
  schedulers: SCHEDULER_NAMES,
  tasks: ['text-to-image', 'image-to-image'],
};
const INPAINT: ModelProfile = {
  model: 'sd-inpainting',
  variant: 'SD 1.x inpainting',
  defaults: { num_steps: 50, guidance_scale: 9, width: 512, height: 512, scheduler: 'pndm', strength: 0.8 },
  schedulers: ['pndm', 'ddim', 'euler'],
  tasks: ['inpainting'],
};

const body = (b: Record<string, unknown>) => createImageBody.parse({ prompt: 'a lighthouse', ...b });
const choice = (p: ModelProfile | null, id = p?.model ?? 'held') => ({ id, profile: p });

function problems(fn: () => unknown): Array<[string, string]> {
  try {
    fn();
  } catch (err) {
    if (err instanceof ValidationError) return err.errors.map((e: FieldError) => [e.field, e.rule]);
    throw err;
  }
  throw new Error('no ValidationError');
}

describe('parameters from the model', () => {
  it("fills in what the request leaves out with the model's variant defaults, and charges what will run", () => {
    expect(jobParams(body({}), choice(SDXL), {})).toEqual({
      numSteps: 50,
      guidanceScale: 5,
      width: 1024,
      height: 1024,
      scheduler: 'euler',
      strength: null,
      cost: 1024 * 1024 * 50,
    });
    expect(jobParams(body({}), choice(TURBO), {})).toMatchObject({ numSteps: 1, guidanceScale: 0, scheduler: 'euler_ancestral', cost: 512 * 512 });
    // What the request gives wins over the model's.
    expect(jobParams(body({ num_steps: 4, width: 768, height: 512 }), choice(TURBO), {})).toMatchObject({
      numSteps: 4,
      guidanceScale: 0,
      width: 768,
      cost: 768 * 512 * 4,
    });
  });

  it("takes an input picture's size and the model's strength; a 9-channel inpainting model takes none", () => {
    const image = { width: 640, height: 384 };
    expect(jobParams(body({}), choice(SDXL), { image })).toMatchObject({ width: 640, height: 384, strength: 0.3 });
    expect(jobParams(body({ strength: 0.5 }), choice(SDXL), { image })).toMatchObject({ strength: 0.5 });
    expect(jobParams(body({}), choice(INPAINT), { image, mask: image })).toMatchObject({ strength: null, numSteps: 50 });
  });

  it('leaves the defaults of a model never served to its first worker, charged as 512x512 at 50 steps meanwhile', () => {
    expect(jobParams(body({ width: 128, height: 128 }), choice(null), {})).toEqual({
      numSteps: null,
      guidanceScale: null,
      width: 128,
      height: 128,
      scheduler: null,
      strength: null,
      cost: 128 * 128 * 50,
    });
  });

  it('refuses, naming each field, what the model cannot do', () => {
    const pic = { width: 512, height: 512 };
    expect(problems(() => jobParams(body({}), choice(SDXL), { image: pic, mask: pic }))).toEqual([['mask', 'not_supported']]);
    expect(problems(() => jobParams(body({}), choice(INPAINT), {}))).toEqual([['image', 'required']]);
    expect(problems(() => jobParams(body({}), choice(INPAINT), { image: pic }))).toEqual([['mask', 'required']]);
    expect(problems(() => jobParams(body({ strength: 0.5 }), choice(INPAINT), { image: pic, mask: pic }))).toEqual([['strength', 'not_supported']]);
    expect(problems(() => jobParams(body({ scheduler: 'lcm' }), choice(INPAINT), {}))).toEqual([
      ['image', 'required'],
      ['scheduler', 'not_supported'],
    ]);
    expect(problems(() => jobParams(body({ width: 1024 }), choice(SDXL), { image: pic }))).toEqual([['image', 'size']]);
    expect(problems(() => jobParams(body({}), choice(SDXL), { image: pic, mask: { width: 256, height: 256 } }))).toEqual([
      ['mask', 'size'],
      ['mask', 'not_supported'],
    ]);
  });
});

describe('the model a request runs on', () => {
  const member = (p: ModelProfile, workerId: string): FleetMember => ({ ...p, workerId, provider: 'cpu', since: new Date(0).toISOString() });
  const fleet = (members: FleetMember[], profiles: ModelProfile[] = members) => ({
    members: () => Promise.resolve(members),
    profiles: () => Promise.resolve(profiles),
  });

  it('is the one named, else DEFAULT_MODEL, else the only one; with its profile', async () => {
    const catalog = new ModelCatalog({ fleet: fleet([member(SDXL, 'a'), member(TURBO, 'b')]), defaultModel: 'sdxl-turbo' });
    expect(await catalog.choose('sdxl')).toEqual({ id: 'sdxl', served: true, profile: SDXL });
    expect(await catalog.choose(null)).toMatchObject({ id: 'sdxl-turbo', served: true });
    const single = new ModelCatalog({ fleet: fleet([member(SDXL, 'a')]) });
    expect(await single.choose(null)).toMatchObject({ id: 'sdxl' });
  });

  it('refuses a model nobody serves naming the field and the served ones; holds a known one with its last profile', async () => {
    const catalog = new ModelCatalog({ fleet: fleet([member(SDXL, 'a')], [SDXL, TURBO]), known: ['sdxl-turbo', 'lcm'] });
    await expect(catalog.choose('sd-9000')).rejects.toMatchObject({
      errors: [
        { field: 'model', rule: 'not_served', message: 'no worker serves "sd-9000" (served now: sdxl; known (jobs wait for a worker): sdxl-turbo, lcm)' },
      ],
    });
    expect(await catalog.choose('sdxl-turbo')).toEqual({ id: 'sdxl-turbo', served: false, profile: TURBO });
    expect(await catalog.choose('lcm')).toEqual({ id: 'lcm', served: false, profile: null });
    // Several and no default: the client must name one.
    await expect(catalog.choose(null)).rejects.toMatchObject({ errors: [{ field: 'model', rule: 'required' }] });
  });
});
