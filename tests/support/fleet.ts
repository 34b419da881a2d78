import { createFleetRegistry } from '../../src/adapters/fleet.js';
import type { Config } from '../../src/config.js';
import type { FleetMember } from '../../src/core/fleet.js';
import { ModelCatalog } from '../../src/core/models.js';
import { SCHEDULER_NAMES } from '../../src/engine/schedulers/types.js';

/**
 * The fleet as in-process API tests need it: the real registry in Redis, with announcements made
 * exactly as a worker makes them (for tests that run no worker but submit jobs), and the model
 * catalog the API builds over it.
 */

/** The model in-process tests announce: SD 1.x with its defaults (50 steps, guidance 9, 512x512, PNDM). */
export const SD_MODEL = 'sd-test';

/** A worker's announcement of an SD 1.x model that takes pictures and masks. */
export function sdMember(model = SD_MODEL, workerId = `${model}-worker`): FleetMember {
  return {
    workerId,
    model,
    variant: 'SD 1.x',
    provider: 'cpu',
    defaults: { num_steps: 50, guidance_scale: 9, width: 512, height: 512, scheduler: 'pndm', strength: 0.8 },
    tasks: ['text-to-image', 'image-to-image', 'inpainting'],
    schedulers: SCHEDULER_NAMES,
    since: new Date().toISOString(),
  };
}

/**
 * Announces `members` for the deployment of `config` (renewed while the test runs), and returns
 * the catalog the API would build, and a close() that withdraws them.
 */
export async function testFleet(
  config: Config,
  members: FleetMember[] = [sdMember()],
  opts: { known?: string[]; defaultModel?: string } = {},
): Promise<{ catalog: ModelCatalog; close(): Promise<void> }> {
  const registry = createFleetRegistry(config.REDIS_URL, config.QUEUE_NAME);
  const announce = () => Promise.all(members.map((m) => registry.announce(m, 60_000)));
  await announce();
  const timer = setInterval(() => void announce(), 20_000);
  return {
    catalog: new ModelCatalog({ fleet: registry, known: opts.known ?? [], defaultModel: opts.defaultModel }),
    async close() {
      clearInterval(timer);
      await Promise.all(members.map((m) => registry.withdraw(m.workerId)));
      registry.close();
    },
  };
}
