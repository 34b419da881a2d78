import { purgeImage, type ImageObjects, type ImagesRepo } from '../core/images.js';

/**
 * Retention: jobs that finished more than RETENTION_DAYS ago lose their image objects, their
 * input pictures and their prompts, as if their owner had deleted them (the row stays as a tombstone: tenant, size,
 * pixel-steps and times, for accounting). It also finishes deletions whose object removal failed
 * (storage down at the time), and removes objects an attempt stored after its job was deleted.
 *
 * Every worker runs one; purging is idempotent, so passes on several workers may overlap.
 */

export interface SweeperDeps {
  repo: ImagesRepo;
  storage: Pick<ImageObjects, 'removeImageObjects' | 'remove'>;
  log: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void };
  /** 0 keeps finished jobs forever (deleted ones are still cleaned up). */
  retentionDays: number;
  batch?: number;
}

export interface SweepSummary {
  expired: number;
  cleaned: number;
  failed: number;
}

export function createSweeper(deps: SweeperDeps) {
  const batch = deps.batch ?? 200;

  async function runOnce(now = new Date()): Promise<SweepSummary> {
    const summary: SweepSummary = { expired: 0, cleaned: 0, failed: 0 };
    const expired =
      deps.retentionDays > 0 ? await deps.repo.findExpired({ finishedBefore: new Date(now.getTime() - deps.retentionDays * 86_400_000), limit: batch }) : [];
    const leftovers = await deps.repo.findDeletedWithObjects({ limit: batch });
    for (const [ids, counter] of [
      [expired, 'expired'],
      [leftovers, 'cleaned'],
    ] as const) {
      for (const id of ids) {
        try {
          await purgeImage(deps, id);
          summary[counter]++;
        } catch (err) {
          // Left for the next pass: the row still names its object.
          summary.failed++;
          deps.log.warn({ err, imageId: id }, 'sweeper: could not remove the objects of a job');
        }
      }
    }
    return summary;
  }

  let timer: NodeJS.Timeout | undefined;
  let running: Promise<unknown> = Promise.resolve();
  return {
    runOnce,
    /** Runs every intervalMs until stop(); a failed pass is logged and tried again next time. */
    start(intervalMs: number) {
      const pass = () => {
        running = running.then(() =>
          runOnce().then(
            (s) => s.expired + s.cleaned + s.failed > 0 && deps.log.info(s, 'sweeper removed expired and deleted images'),
            (err: unknown) => deps.log.warn({ err }, 'sweeper pass failed'),
          ),
        );
      };
      timer = setInterval(pass, intervalMs);
      timer.unref();
    },
    async stop() {
      if (timer) clearInterval(timer);
      await running;
    },
  };
}
