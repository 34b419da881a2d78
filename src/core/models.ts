import { DependencyUnavailableError, ValidationError } from './errors.js';
import { servedModels, type FleetRegistry, type ModelProfile, type ServedModel } from './fleet.js';

/**
 * Which model a request runs on. A request may name a `model`; one that names none gets the
 * default model. A model is
 *   served  some worker announced it within its time to live: the job goes to its queue;
 *   held    no worker serves it, but the operator lists it in KNOWN_MODELS (a model scaled to
 *           zero, or whose workers are restarting): the job waits in its queue until one starts;
 * and anything else is refused with a 400 naming the models that are served (and known).
 *
 * The default model is DEFAULT_MODEL when set, else the only model served or known, if there is
 * exactly one (the single-model deployment needs no setting); with several and no DEFAULT_MODEL,
 * a request must name one.
 *
 * The fleet is read from Redis at most once per `cacheMs` (not per request). A name the last read
 * does not know is read again before it is refused, so a worker that just announced itself is
 * found at once. If Redis cannot be read, the last read is used; with none, a configured model
 * is held without a profile and anything else is a 503.
 */

export interface ModelCatalogOptions {
  fleet: Pick<FleetRegistry, 'members' | 'profiles'>;
  /** KNOWN_MODELS: held when no worker serves them. */
  known?: readonly string[];
  /** DEFAULT_MODEL. */
  defaultModel?: string | undefined;
  /** How long one read of the fleet is used (default 1 s). */
  cacheMs?: number;
}

export interface ModelChoice {
  id: string;
  /** False: no worker serves it now, and the job waits (a known model). */
  served: boolean;
  /** The model's profile (last announced), null when it was never served. */
  profile: ModelProfile | null;
}

export interface FleetSnapshot {
  served: ServedModel[];
  profiles: Map<string, ModelProfile>;
}

export class ModelCatalog {
  private cache: { snapshot: FleetSnapshot; at: number } | undefined;
  private reading: Promise<FleetSnapshot> | undefined;
  readonly known: readonly string[];

  constructor(private readonly opts: ModelCatalogOptions) {
    this.known = [...new Set(opts.known ?? [])];
  }

  get defaultModel(): string | undefined {
    return this.opts.defaultModel;
  }

  /** The fleet as last read (read again when older than cacheMs); the last good read if Redis fails, else throws. */
  async snapshot(fresh = false): Promise<FleetSnapshot> {
    const now = performance.now();
    if (!fresh && this.cache && now - this.cache.at <= (this.opts.cacheMs ?? 1_000)) return this.cache.snapshot;
    // One read at a time: concurrent requests share it.
    this.reading ??= (async () => {
      try {
        const [members, profiles] = await Promise.all([this.opts.fleet.members(), this.opts.fleet.profiles()]);
        const snapshot = { served: servedModels(members), profiles: new Map(profiles.map((p) => [p.model, p])) };
        this.cache = { snapshot, at: performance.now() };
        return snapshot;
      } catch (err) {
        if (this.cache) return this.cache.snapshot;
        throw new DependencyUnavailableError('job queue', { cause: err });
      } finally {
        this.reading = undefined;
      }
    })();
    return this.reading;
  }

  /** The model a request runs on (`requested`, or the default), or a ValidationError naming `model`. */
  async choose(requested: string | null | undefined): Promise<ModelChoice> {
    let snapshot: FleetSnapshot | undefined;
    try {
      snapshot = await this.snapshot();
      if (!this.resolvable(snapshot, requested)) snapshot = await this.snapshot(true);
    } catch (err) {
      // Redis unreadable and never read: only what the configuration alone names can be accepted.
      const name = requested ?? this.opts.defaultModel ?? (this.known.length === 1 ? this.known[0] : undefined);
      if (name !== undefined && this.known.includes(name)) return { id: name, served: false, profile: null };
      throw new DependencyUnavailableError('job queue', { cause: err });
    }
    const name = requested ?? this.defaultOf(snapshot);
    const served = snapshot.served.find((m) => m.id === name);
    if (name !== undefined && served) return { id: name, served: true, profile: profileOf(served) };
    if (name !== undefined && this.known.includes(name)) return { id: name, served: false, profile: snapshot.profiles.get(name) ?? null };
    throw new ValidationError([this.refusal(snapshot, requested)]);
  }

  /** Whether a model has a worker now, from the last read (no Redis round trip while it is fresh). */
  async isServed(model: string): Promise<boolean | undefined> {
    try {
      return (await this.snapshot()).served.some((m) => m.id === model);
    } catch {
      return undefined;
    }
  }

  /** The default model of a snapshot, when one can be named. */
  defaultOf(snapshot: FleetSnapshot): string | undefined {
    if (this.opts.defaultModel !== undefined) return this.opts.defaultModel;
    const candidates = new Set([...snapshot.served.map((m) => m.id), ...this.known]);
    return candidates.size === 1 ? [...candidates][0] : undefined;
  }

  private resolvable(snapshot: FleetSnapshot, requested: string | null | undefined): boolean {
    const name = requested ?? this.defaultOf(snapshot);
    return name !== undefined && (this.known.includes(name) || snapshot.served.some((m) => m.id === name));
  }

  private refusal(snapshot: FleetSnapshot, requested: string | null | undefined) {
    const served = snapshot.served.map((m) => m.id);
    const held = this.known.filter((k) => !served.includes(k));
    const offer = [
      served.length > 0 ? `served now: ${served.join(', ')}` : 'no model is served now',
      ...(held.length > 0 ? [`known (jobs wait for a worker): ${held.join(', ')}`] : []),
    ].join('; ');
    if (requested != null) return { field: 'model', rule: 'not_served', message: `no worker serves "${requested}" (${offer})` };
    if (this.opts.defaultModel !== undefined)
      return { field: 'model', rule: 'not_served', message: `no worker serves the default model "${this.opts.defaultModel}"; name another (${offer})` };
    if (served.length + held.length > 1) return { field: 'model', rule: 'required', message: `name a model: several are available (${offer})` };
    return { field: 'model', rule: 'not_served', message: `no worker serves a model yet, and none is configured as known (${offer})` };
  }
}

function profileOf(m: ServedModel): ModelProfile {
  return { model: m.id, variant: m.variant, defaults: m.defaults, schedulers: m.schedulers, tasks: m.tasks };
}
