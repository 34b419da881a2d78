import type { FastifyPluginAsync } from 'fastify';
import type { ServedModel } from '../core/fleet.js';
import { GENERATION_DEFAULTS, GENERATION_LIMITS, MAX_IMAGES } from '../engine/pipeline.js';
import { SCHEDULER_NAMES, type SchedulerName } from '../engine/schedulers/types.js';
import { modelsSchema, problems, schedulersSchema } from './schemas.js';

/**
 * What the fleet serves, for clients that build their forms from it: GET /models (each model
 * with its variant, the workers and providers serving it, the defaults a request gets, its
 * schedulers) and GET /schedulers, both with the limits a request must keep.
 */

export interface DiscoveryOptions {
  models(): Promise<ServedModel[]>;
  /** MAX_PIXEL_STEPS of this API. */
  maxPixelSteps: number;
}

const DESCRIPTIONS: Record<SchedulerName, string> = {
  pndm: "PNDM (PLMS), Stable Diffusion 1.x's own; deterministic",
  ddim: 'DDIM; deterministic, good at few steps',
  euler: 'Euler (Karras et al.); deterministic',
  euler_ancestral: 'Euler ancestral; adds fresh noise each step (seeded), livelier at few steps',
  dpmpp_2m: 'DPM-Solver++ 2M with Karras sigmas; deterministic, sharp at 20-30 steps',
  lcm: 'LCM; for latent-consistency models, 2-8 steps; adds noise each step (seeded)',
};

export const discoveryRoutes: FastifyPluginAsync<DiscoveryOptions> = async (app, opts) => {
  const limits = {
    min_steps: 1,
    max_steps: GENERATION_LIMITS.maxSteps,
    min_side: GENERATION_LIMITS.minSide,
    max_side: GENERATION_LIMITS.maxSide,
    side_multiple_of: 8,
    max_guidance_scale: GENERATION_LIMITS.maxGuidance,
    max_prompt_chars: GENERATION_LIMITS.maxPromptChars,
    max_images: MAX_IMAGES,
    max_pixel_steps: opts.maxPixelSteps,
  };
  // What POST /generated-images fills in for a field left out (the API's, whatever the model).
  const requestDefaults = {
    num_steps: GENERATION_DEFAULTS.numSteps,
    guidance_scale: GENERATION_DEFAULTS.guidanceScale,
    width: GENERATION_DEFAULTS.width,
    height: GENERATION_DEFAULTS.height,
    scheduler: 'pndm',
    num_images: 1,
  };

  app.get(
    '/models',
    {
      schema: {
        tags: ['discovery'],
        summary: 'The models the fleet serves, with defaults and limits',
        response: { 200: modelsSchema, ...problems(401, 429, 503) },
      },
    },
    async () => ({
      models: (await opts.models()).map((m) => ({
        id: m.id,
        variant: m.variant,
        workers: m.workers,
        providers: m.providers,
        model_defaults: m.defaults,
        schedulers: m.schedulers,
        since: m.since,
      })),
      request_defaults: requestDefaults,
      limits,
    }),
  );

  app.get(
    '/schedulers',
    {
      schema: {
        tags: ['discovery'],
        summary: 'The schedulers, the models that take them, and the limits',
        response: { 200: schedulersSchema, ...problems(401, 429, 503) },
      },
    },
    async () => {
      const models = await opts.models();
      return {
        schedulers: SCHEDULER_NAMES.map((name) => ({
          name,
          description: DESCRIPTIONS[name],
          models: models.filter((m) => m.schedulers.includes(name)).map((m) => m.id),
          default_for: models.filter((m) => m.defaults.scheduler === name).map((m) => m.id),
        })),
        default: requestDefaults.scheduler,
        limits,
      };
    },
  );
};
