/**
 * What the fleet serves: every worker announces its model (name, variant, provider, the
 * defaults a request gets and the schedulers it takes) with a time to live, and renews it while
 * it runs; a worker that stops or dies drops out when its announcement expires. The API answers
 * GET /models, GET /schedulers and GET /v1/models from it.
 */

export interface FleetMember {
  workerId: string;
  /** The model's name: the folder name of its export ("test-engine" for the test double). */
  model: string;
  /** What loading found ("SD 1.x", "SDXL Turbo", ...), when known. */
  variant: string | null;
  provider: string;
  /** What a request that leaves parameters out gets on this model. */
  defaults: { num_steps: number; guidance_scale: number; width: number; height: number; scheduler: string };
  schedulers: readonly string[];
  /** When the worker's model was loaded. */
  since: string;
}

export interface FleetRegistry {
  announce(member: FleetMember, ttlMs: number): Promise<void>;
  withdraw(workerId: string): Promise<void>;
  /** Live members (announced within their time to live). */
  members(): Promise<FleetMember[]>;
}

export interface ServedModel {
  id: string;
  variant: string | null;
  workers: number;
  providers: string[];
  defaults: FleetMember['defaults'];
  schedulers: string[];
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
      since: ms.map((m) => m.since).sort()[0]!,
    }))
    .sort((a, b) => b.workers - a.workers || a.id.localeCompare(b.id));
}
