import type { Config } from '../config.js';

/**
 * The worker's shutdown timeline, in one place: the process (src/worker/main.ts) waits these
 * long, and the deploy files (compose's stop_grace_period, Kubernetes'
 * terminationGracePeriodSeconds) must allow at least their sum, or a rollout kills a worker
 * while it is still handing its job back (tests/integration/deploy-config.test.ts checks it).
 */
export const SHUTDOWN_TIMEOUTS_MS = {
  /** After the grace period the active job is told to stop; it must be handed back within this. */
  release: 10_000,
  /** Closing the engine, Postgres, Redis and the metrics server, which run in parallel. */
  cleanup: 10_000,
} as const;

/** The longest a worker takes from SIGTERM to exit, for a given SHUTDOWN_GRACE_MS. */
export function shutdownBudgetMs(config: Pick<Config, 'SHUTDOWN_GRACE_MS'>): number {
  return config.SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUTS_MS.release + SHUTDOWN_TIMEOUTS_MS.cleanup;
}
