import type { FastifyPluginAsync } from 'fastify';
import type { ModelDefaultParams, ModelTask } from '../core/fleet.js';
import type { FleetSnapshot } from '../core/models.js';
import { GENERATION_LIMITS, MAX_IMAGES } from '../engine/pipeline.js';
import { SCHEDULER_NAMES, type SchedulerName } from '../engine/schedulers/types.js';
import { modelsSchema, problems, schedulersSchema } from './schemas.js';

/**
 * What the fleet serves, for clients that build their forms from it: GET /models (each model
 * served now or known, with its status, the variant its workers' loading found, the workers and
 * providers serving it, the defaults a request gets, what it can do, its schedulers) and GET
 * /schedulers, both with the limits a request must keep.
 */

export interface DiscoveryOptions {
  /** The fleet as the model catalog last read it (src/core/models.ts). */
  fleet(): Promise<FleetSnapshot>;
  /** KNOWN_MODELS: listed (with status no_worker) while no worker serves them. */
  known: readonly string[];
  /** The model of requests that name none, in a snapshot (ModelCatalog.defaultOf). */
  defaultOf(snapshot: FleetSnapshot): string | undefined;
  /** MAX_PIXEL_STEPS of this API. */
  maxPixelSteps: number;
}

interface ListedModel {
  id: string;
  status: 'serving' | 'no_worker';
  default: boolean;
  variant: string | null;
  workers: number;
  providers: string[];
  model_defaults: ModelDefaultParams | null;
  tasks: ModelTask[];
  schedulers: string[];
  since: string | null;
}

/** Served models (most workers first), then known ones without a worker, with their last announced profile. */
function listing(snapshot: FleetSnapshot, known: readonly string[], defaultModel: string | undefined): ListedModel[] {
  const served: ListedModel[] = snapshot.served.map((m) => ({
    id: m.id,
    status: 'serving',
    default: m.id === defaultModel,
    variant: m.variant,
    workers: m.workers,
    providers: m.providers,
    model_defaults: m.defaults,
    tasks: m.tasks,
    schedulers: m.schedulers,
    since: m.since,
  }));
  const idle: ListedModel[] = known
    .filter((id) => !snapshot.served.some((m) => m.id === id))
    .map((id) => {
      const p = snapshot.profiles.get(id);
      return {
        id,
        status: 'no_worker',
        default: id === defaultModel,
        variant: p?.variant ?? null,
        workers: 0,
        providers: [],
        model_defaults: p?.defaults ?? null,
        tasks: [...(p?.tasks ?? [])],
        schedulers: [...(p?.schedulers ?? [])],
        since: null,
      };
    });
  return [...served, ...idle];
}

const DESCRIPTIONS: Record<SchedulerName, string> = {
  pndm: "PNDM (PLMS), Stable Diffusion 1.x's own; deterministic",
  ddim: 'DDIM; deterministic, good at few steps',
  euler: 'Euler (Karras et al.); deterministic',
  euler_ancestral: 'Euler ancestral; adds fresh noise each step (seeded), livelier at few steps',
  dpmpp_2m: 'DPM-Solver++ 2M with Karras sigmas; deterministic, sharp at 20-30 steps',
  lcm: 'LCM; for latent-consistency models, 2-8 steps; adds noise each step (seeded)',
};

/** The limits a request must keep, as GET /models and GET /schedulers list them. */
export function requestLimits(maxPixelSteps: number) {
  return {
    min_steps: 1,
    max_steps: GENERATION_LIMITS.maxSteps,
    min_side: GENERATION_LIMITS.minSide,
    max_side: GENERATION_LIMITS.maxSide,
    side_multiple_of: 8,
    max_guidance_scale: GENERATION_LIMITS.maxGuidance,
    max_prompt_chars: GENERATION_LIMITS.maxPromptChars,
    max_images: MAX_IMAGES,
    max_pixel_steps: maxPixelSteps,
  };
}

export const discoveryRoutes: FastifyPluginAsync<DiscoveryOptions> = async (app, opts) => {
  const limits = requestLimits(opts.maxPixelSteps);
  // What POST /generated-images fills in for a request that names no model: the default model's own defaults.
  const requestDefaults = (models: ListedModel[]) => {
    const d = models.find((m) => m.default);
    return d?.model_defaults ? { ...d.model_defaults, num_images: 1, model: d.id } : null;
  };
  const listed = async () => {
    const snapshot = await opts.fleet();
    return listing(snapshot, opts.known, opts.defaultOf(snapshot));
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
    async () => {
      const models = await listed();
      return { models, request_defaults: requestDefaults(models), limits };
    },
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
      const models = await listed();
      return {
        schedulers: SCHEDULER_NAMES.map((name) => ({
          name,
          description: DESCRIPTIONS[name],
          models: models.filter((m) => m.schedulers.includes(name)).map((m) => m.id),
          default_for: models.filter((m) => m.model_defaults?.scheduler === name).map((m) => m.id),
        })),
        default: requestDefaults(models)?.scheduler ?? null,
        limits,
      };
    },
  );
};
