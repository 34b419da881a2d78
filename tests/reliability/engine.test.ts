import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { saveReport, type ServiceProcess } from '../support/processes.js';
import { metricValue, pollFor, startSystem, submit, waitTerminal, type System } from '../support/reliability.js';

/**
 * An engine that dies, hangs or runs out of memory, and an attempt past its deadline, with real
 * worker processes on the engine's test double (its failure directives: [test:crash] ends the
 * engine thread, [test:hang] blocks it in a busy loop, [test:oom] fails a real allocation).
 */

let sys: System;
const report: Record<string, unknown> = {};

beforeAll(async () => {
  // A restart waits ENGINE_RESTART_BACKOFF_MS (1 s, then 2 s) before reloading: long enough that
  // /readyz is read while the engine is down, after the worker's "engine down" line.
  sys = await startSystem('t2i-engine', { ENGINE_RESTART_BACKOFF_MS: '1000', ENGINE_STALL_MS: '1500', JOB_ATTEMPTS: '3' });
}, 120_000);
afterEach(async () => {
  await sys.stopProcesses();
});
afterAll(async () => {
  await sys?.stop();
  saveReport(report);
}, 60_000);

function metricsUrlOf(w: ServiceProcess): string {
  const line = w.lines.find((l) => l.msg === 'worker ready');
  return String(line?.metricsUrl);
}

/**
 * A job that takes the engine down, then a queue of ordinary jobs: the worker stops taking jobs
 * while its engine is down, so none of them is lost to it; the poison job fails as
 * engine_crashed after the engine went down twice on it.
 */
async function engineGoesDown(directive: '[test:crash]' | '[test:hang]', reason: 'crashed' | 'stalled') {
  const { url } = await sys.startApiProcess();
  // One job at a time, so that every other job runs after the poison one (test 6 is the batched case).
  const w = await sys.startWorkerProcess(`engine-${reason}`, { BATCH_MAX: '1' }, 40);
  const poison = await submit(url, { prompt: `poison ${directive}`, num_steps: 5 }, sys.auth);
  const others: string[] = [];
  for (let i = 0; i < 6; i++) others.push(await submit(url, { prompt: `ordinary ${i}`, num_steps: 5 }, sys.auth));
  // Not ready while the engine is down (the restart waits its backoff first), ready once it is back.
  await w.waitForLine((l) => l.msg === 'engine down; not taking jobs', 30_000);
  const whileDown = (await fetch(`${metricsUrlOf(w)}/readyz`)).status;
  await w.waitForLine((l) => l.msg === 'engine restarted; taking jobs again', 30_000);
  await waitTerminal(sys.db, [poison, ...others], 60_000);
  const afterwards = await pollFor(async () => ((await fetch(`${metricsUrlOf(w)}/readyz`)).status === 200 ? 200 : undefined), 15_000, 100);
  const poisonRow = (await sys.repo.get(poison))!;
  const poisonAttempts = await sys.repo.attempts(poison);
  const otherRows = await sys.db.generatedImage.findMany({ where: { id: { in: others } } });
  const otherAttempts = await sys.db.jobAttempt.findMany({ where: { imageId: { in: others } } });
  const restarts = await metricValue(metricsUrlOf(w), `t2i_engine_restarts_total{reason="${reason}",model="test-engine"}`);

  expect(poisonRow).toMatchObject({ status: 'failed', errorCode: 'engine_crashed' });
  expect(poisonAttempts.map((a) => a.outcome)).toEqual(['engine_failed', 'engine_failed']);
  // Intake stopped while the engine was down: no ordinary job was taken by a dead engine.
  expect(otherRows.map((r) => r.status)).toEqual(others.map(() => 'succeeded'));
  expect(otherAttempts.map((a) => a.outcome)).toEqual(others.map(() => 'succeeded'));
  expect(restarts).toBe(2);
  expect({ whileDown, afterwards }).toEqual({ whileDown: 503, afterwards: 200 });
  expect(w.running).toBe(true);
  return {
    poison: { status: poisonRow.status, code: poisonRow.errorCode, engineFailures: poisonAttempts.length },
    others: { jobs: others.length, succeeded: otherRows.filter((r) => r.status === 'succeeded').length, attempts: otherAttempts.length },
    engineRestarts: restarts,
    readyzWhileDown: whileDown,
  };
}

describe('the engine, with real processes', () => {
  it('1. a dead engine thread stops intake, hands its job back, and is restarted; a job that kills it twice fails as engine_crashed', async () => {
    report.engineCrash = await engineGoesDown('[test:crash]', 'crashed');
  });

  it('2. a hung generation (no progress for ENGINE_STALL_MS) is treated the same way', async () => {
    report.engineHang = await engineGoesDown('[test:hang]', 'stalled');
  });

  it('3. past ENGINE_MAX_RESTARTS the worker exits with code 1 for its supervisor, handing its job back first', async () => {
    const { url } = await sys.startApiProcess();
    const w = await sys.startWorkerProcess('engine-give-up', { ENGINE_MAX_RESTARTS: '0' }, 40);
    const id = await submit(url, { prompt: 'poison [test:crash]', num_steps: 5 }, sys.auth);
    const t0 = Date.now();
    const exit = await w.exited;
    expect(exit.code).toBe(1);
    expect(w.lines.some((l) => l.msg.startsWith('the worker cannot go on'))).toBe(true);
    expect(await sys.repo.get(id)).toMatchObject({ status: 'queued' });
    expect((await sys.repo.attempts(id)).map((a) => a.outcome)).toEqual(['engine_failed']);
    report.engineGiveUp = { exitCode: exit.code, exitMs: Date.now() - t0, job: (await sys.repo.get(id))?.status };
    // Leave no poison job queued for the next test's worker (which may batch it with its own).
    expect((await fetch(`${url}/generated-images/${id}/cancel`, { method: 'POST', headers: sys.auth })).status).toBe(200);
  });

  it('4. an allocation failure fails its job with out_of_memory, not retried; the worker stays ready and runs the next job', async () => {
    const { url } = await sys.startApiProcess();
    const w = await sys.startWorkerProcess('engine-oom', {}, 10);
    const oom = await submit(url, { prompt: 'too big [test:oom]', num_steps: 5 }, sys.auth);
    await waitTerminal(sys.db, [oom], 30_000);
    const job = (await (await fetch(`${url}/generated-images/${oom}`, { headers: sys.auth })).json()) as {
      status: string;
      attempts: number;
      error: { code: string; message: string };
    };
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'out_of_memory' } });
    expect(job.error.message).not.toMatch(/ArrayBuffer|allocation failed/);
    expect((await fetch(`${metricsUrlOf(w)}/readyz`)).status).toBe(200);
    const next = await submit(url, { prompt: 'small', num_steps: 5 }, sys.auth);
    await waitTerminal(sys.db, [next], 30_000);
    expect((await sys.repo.get(next))?.status).toBe('succeeded');
    expect(await metricValue(metricsUrlOf(w), 't2i_engine_restarts_total{reason="out_of_memory",model="test-engine"}')).toBe(0);
    report.outOfMemory = { status: job.status, code: job.error.code, attempts: job.attempts, nextJob: (await sys.repo.get(next))?.status };
  });

  it('5. every attempt has a deadline: past JOB_TIMEOUT_MS it is aborted, recorded as timed_out, retried, then failed', async () => {
    // Attempts and backoff are set when the API enqueues; the deadline is the worker's.
    const { url } = await sys.startApiProcess({ JOB_ATTEMPTS: '2', JOB_BACKOFF_MS: '100' });
    await sys.startWorkerProcess('engine-deadline', { JOB_TIMEOUT_MS: '1000' }, 40);
    // 100 steps of 40 ms is 4 s, past the 1 s deadline.
    const t0 = Date.now();
    const id = await submit(url, { prompt: 'slow', num_steps: 100 }, sys.auth);
    await waitTerminal(sys.db, [id], 30_000);
    const elapsed = Date.now() - t0;
    const job = (await (await fetch(`${url}/generated-images/${id}`, { headers: sys.auth })).json()) as {
      status: string;
      error: { code: string; message: string };
    };
    expect(job).toMatchObject({ status: 'failed', error: { code: 'timed_out', message: 'The job took longer than its time limit of 1 s.' } });
    const attempts = await sys.repo.attempts(id);
    expect(attempts.map((a) => [a.outcome, a.errorCode])).toEqual([
      ['retried', 'timed_out'],
      ['failed', 'timed_out'],
    ]);
    for (const a of attempts) expect(a.finishedAt!.getTime() - a.startedAt.getTime()).toBeLessThan(1_000 + 1_000);
    report.deadline = { timeoutMs: 1000, attempts: attempts.length, outcome: job.error.code, submitToFailedMs: elapsed };
  });

  it('6. a batch that takes the engine down hands every job back unblamed; each then runs alone, so only the poison job fails', async () => {
    const { url } = await sys.startApiProcess();
    const w = await sys.startWorkerProcess('engine-batch', { BATCH_MAX: '3', BATCH_WAIT_MS: '1000' }, 40);
    const poison = await submit(url, { prompt: 'poison [test:crash]', num_steps: 5 }, sys.auth);
    const others = [await submit(url, { prompt: 'ordinary 1', num_steps: 5 }, sys.auth), await submit(url, { prompt: 'ordinary 2', num_steps: 5 }, sys.auth)];
    await waitTerminal(sys.db, [poison, ...others], 60_000);
    expect(await sys.repo.get(poison)).toMatchObject({ status: 'failed', errorCode: 'engine_crashed' });
    // Released with the batch (not counted), then taken down twice alone. A job handed back can
    // be fetched again before the consumer has paused; it then meets the restarting engine and is
    // released again, unblamed.
    const poisonOutcomes = (await sys.repo.attempts(poison)).map((a) => a.outcome);
    expect(poisonOutcomes[0]).toBe('released');
    expect(poisonOutcomes.filter((o) => o === 'engine_failed')).toHaveLength(2);
    expect(poisonOutcomes.filter((o) => o !== 'engine_failed' && o !== 'released')).toEqual([]);
    const othersHandedBack: number[] = [];
    for (const id of others) {
      expect((await sys.repo.get(id))?.status).toBe('succeeded');
      const outcomes = (await sys.repo.attempts(id)).map((a) => a.outcome);
      othersHandedBack.push(outcomes.filter((o) => o === 'released').length);
      expect(outcomes[0]).toBe('released');
      expect(outcomes.slice(0, -1).filter((o) => o !== 'released')).toEqual([]);
      expect(outcomes.at(-1)).toBe('succeeded');
    }
    expect(await metricValue(metricsUrlOf(w), 't2i_engine_restarts_total{reason="crashed",model="test-engine"}')).toBe(3);
    expect(w.running).toBe(true);
    report.batchCrash = {
      batch: 3,
      poison: { code: 'engine_crashed', outcomes: poisonOutcomes },
      others: { succeeded: others.length, timesHandedBack: othersHandedBack },
      engineRestarts: 3,
    };
  });
});
