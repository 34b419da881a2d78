import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { shutdownBudgetMs } from '../../src/worker/shutdown.js';
import { saveReport } from '../support/processes.js';
import { expectEachSucceededOnce, pollFor, startSystem, submit, waitTerminal, type System } from '../support/reliability.js';

/**
 * Shutdown with real processes: SIGTERM lets a job finish within the grace period or hands it
 * back after it; a second signal exits at once; and every cleanup step runs, with the documented
 * exit code, even when Redis is gone and closing the consumer times out.
 */

let sys: System;
const report: Record<string, unknown> = {};

beforeAll(async () => {
  sys = await startSystem('t2i-shutdown');
}, 120_000);
afterEach(async () => {
  await sys.stopProcesses();
});
afterAll(async () => {
  await sys?.stop();
  saveReport(report);
}, 60_000);

/** A second SIGTERM exits at once: within a second. */
const SECOND_SIGNAL_BOUND_MS = 1_000;

describe('shutdown, with real processes', () => {
  it('1. SIGTERM during a job: finished within a long grace period, handed back after a short one; a second signal exits at once', async () => {
    const { url } = await sys.startApiProcess();
    // Grace longer than the job: the job finishes, then the worker exits cleanly (code 0).
    const patient = await sys.startWorkerProcess('term-long', { SHUTDOWN_GRACE_MS: '20000' });
    const a = await submit(url, { prompt: 'finish me', num_steps: 30 }, sys.auth);
    await pollFor(async () => ((await sys.repo.get(a))?.progress ?? 0) > 10 || undefined, 20_000);
    const t0 = Date.now();
    patient.kill('SIGTERM');
    const exit1 = await patient.exited;
    const longGraceExitMs = Date.now() - t0;
    expect(exit1.code).toBe(0);
    expect((await sys.repo.get(a))?.status).toBe('succeeded');
    // At most the rest of the job (30 steps of 40 ms) plus the cleanup.
    expect(longGraceExitMs).toBeLessThanOrEqual(30 * 40 + 3_000);

    // Grace shorter than the job: handed back, run again by the next worker.
    const hasty = await sys.startWorkerProcess('term-short', { SHUTDOWN_GRACE_MS: '300' });
    const b = await submit(url, { prompt: 'hand me back', num_steps: 50 }, sys.auth);
    await pollFor(async () => ((await sys.repo.get(b))?.progress ?? 0) > 5 || undefined, 20_000);
    const t1 = Date.now();
    hasty.kill('SIGTERM');
    const exit2 = await hasty.exited;
    const shortGraceExitMs = Date.now() - t1;
    expect(exit2.code).toBe(0);
    expect(shortGraceExitMs).toBeLessThanOrEqual(300 + 3_000);
    expect(hasty.lines.some((l) => l.jobId === b && l.outcome === 'released')).toBe(true);
    expect((await sys.repo.get(b))?.status).toBe('queued');
    const next = await sys.startWorkerProcess('term-next');
    await waitTerminal(sys.db, [b], 30_000);
    await expectEachSucceededOnce(sys, [b]);
    expect((await sys.repo.attempts(b)).map((x) => x.outcome)).toEqual(['released', 'succeeded']);

    // A second signal does not wait for anything: exit 130.
    const c = await submit(url, { prompt: 'impatient', num_steps: 50 }, sys.auth);
    await pollFor(async () => ((await sys.repo.get(c))?.status === 'running' ? true : undefined), 20_000);
    next.kill('SIGTERM');
    // The second signal must find the first one handled: the worker says so when it starts closing.
    await next.waitForLine((l) => l.msg === 'shutting down', 5_000);
    const t2 = Date.now();
    next.kill('SIGTERM');
    const exit3 = await next.exited;
    const secondSignalExitMs = Date.now() - t2;
    expect(exit3.code).toBe(130);
    expect(secondSignalExitMs).toBeLessThanOrEqual(SECOND_SIGNAL_BOUND_MS);
    report.sigterm = {
      longGrace: { exitMs: longGraceExitMs, exitCode: exit1.code, job: (await sys.repo.get(a))?.status },
      shortGrace: { graceMs: 300, exitMs: shortGraceExitMs, exitCode: exit2.code, attempts: (await sys.repo.attempts(b)).map((x) => x.outcome) },
      secondSignal: { exitMs: secondSignalExitMs, exitCode: exit3.code, bound: SECOND_SIGNAL_BOUND_MS },
    };
  });

  it('2. Redis gone during shutdown: closing the consumer times out, every other cleanup still runs, exit code 1, no unhandled rejection', async () => {
    const { url } = await sys.startApiProcess();
    const env = { SHUTDOWN_GRACE_MS: '300' };
    const w = await sys.startWorkerProcess('term-redis', env);
    const id = await submit(url, { prompt: 'redis goes away', num_steps: 100 }, sys.auth);
    await pollFor(async () => ((await sys.repo.get(id))?.progress ?? 0) > 5 || undefined, 20_000);
    await sys.services.stopService('redis');
    const t0 = Date.now();
    w.kill('SIGTERM');
    const exit = await w.exited;
    const exitMs = Date.now() - t0;
    await sys.services.startService('redis');
    const budget = shutdownBudgetMs({ SHUTDOWN_GRACE_MS: 300 });
    expect(exit.code).toBe(1);
    expect(exitMs).toBeLessThanOrEqual(budget + 2_000);
    const failedSteps = w.lines.filter((l) => l.msg === 'shutdown step failed').map((l) => JSON.stringify(l.err));
    expect(failedSteps.some((s) => s.includes('closing the queue consumer'))).toBe(true);
    expect(w.lines.some((l) => l.msg === 'worker stopped' && l.clean === false)).toBe(true);
    expect(w.lines.some((l) => /unhandled|uncaught/.test(l.msg))).toBe(false);
    // The job was handed back in Postgres (which stayed up) before the queue connection was given up.
    expect((await sys.repo.attempts(id)).map((a) => a.outcome)).toEqual(['released']);
    report.shutdownWithoutRedis = { exitCode: exit.code, exitMs, budgetMs: budget, failedSteps: failedSteps.length };
  });
});
