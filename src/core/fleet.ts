/**
 * What the fleet serves: every worker announces its model (name, variant, provider, the
 * defaults a request gets and the schedulers it takes) with a time to live, and renews it while
 * it runs; a worker that stops or dies drops out when its announcement expires. The API answers
 * GET /models, GET /schedulers and GET /v1/models from it, and routes each request to the queue
 * of the model it names (src/core/models.ts).
 *
 * Each announcement also leaves the model's profile (variant, defaults, tasks) behind, kept after
 * the last worker of the model is gone: a model scaled to zero still has the defaults its workers
 * announced, so a request held for it is charged and filled in as it will run.
 */

/** What a model can be asked to do: text-to-image, an input picture with a strength, an input picture with a mask. */
export const MODEL_TASKS = ['text-to-image', 'image-to-image', 'inpainting'] as const;
export type ModelTask = (typeof MODEL_TASKS)[number];

/** What a request that leaves parameters out gets on a model. */
export interface ModelDefaultParams {
  num_steps: number;
  guidance_scale: number;
  width: number;
  height: number;
  scheduler: string;
  /** Image-to-image's strength when the request gives an image and no strength. */
  strength: number;
}

/** A model as its workers describe it: what loading found and what requests get. */
export interface ModelProfile {
  /** The model's name: MODEL_NAME, else the folder name of its export ("test-engine" for the test double). */
  model: string;
  /** What loading found ("SD 1.x", "SDXL Turbo", ...), when known. */
  variant: string | null;
  defaults: ModelDefaultParams;
  schedulers: readonly string[];
  tasks: readonly ModelTask[];
}

export interface FleetMember extends ModelProfile {
  workerId: string;
  provider: string;
  /** When the worker's model was loaded. */
  since: string;
}

export interface FleetRegistry {
  /** Announces (or renews) a worker for ttlMs, and records its model's profile. */
  announce(member: FleetMember, ttlMs: number): Promise<void>;
  withdraw(workerId: string): Promise<void>;
  /** Live members (announced within their time to live). */
  members(): Promise<FleetMember[]>;
  /** The last profile announced for each model that was ever served, live or not. */
  profiles(): Promise<ModelProfile[]>;
}

export interface ServedModel {
  id: string;
  variant: string | null;
  workers: number;
  providers: string[];
  defaults: ModelDefaultParams;
  schedulers: string[];
  tasks: ModelTask[];
  since: string;
}

/** The members grouped by model, the one most workers serve first. */
export function servedModels(members: FleetMember[]): ServedModel[] {
  const byModel = new Map<string, FleetMember[]>();
  for (const m of members) byModel.set(m.model, [...(byModel.get(m.model) ?? []), m]);
  return [...byModel.entries()]
    .map(([id, ms]) => ({
      id,
      variant: ms[0]!.variant,
      workers: ms.length,
      providers: [...new Set(ms.map((m) => m.provider))].sort(),
      defaults: ms[0]!.defaults,
      schedulers: [...new Set(ms.flatMap((m) => m.schedulers))],
      // Workers of one model may differ (an export with or without its VAE encoder): what all of them can do.
      tasks: MODEL_TASKS.filter((t) => ms.every((m) => m.tasks.includes(t))),
      since: ms.map((m) => m.since).sort()[0]!,
    }))
    .sort((a, b) => b.workers - a.workers || a.id.localeCompare(b.id));
}

/** The tasks an engine's model can do, from what loading found. */
export function modelTasks(found: { inpainting: boolean; imageInputs: boolean; family: 'sd' | 'sdxl' | 'test' }): ModelTask[] {
  // A 9-channel inpainting UNet needs a picture and a mask, always starts from noise (no strength).
  if (found.inpainting) return ['inpainting'];
  if (!found.imageInputs) return ['text-to-image'];
  // SD 1.x/2.x take a mask on the legacy 4-channel path; SDXL has no inpainting here.
  return found.family === 'sdxl' ? ['text-to-image', 'image-to-image'] : ['text-to-image', 'image-to-image', 'inpainting'];
}
