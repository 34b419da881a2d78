import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CuttableProxy, saveReport } from '../support/processes.js';
import { expectEachSucceededOnce, FAST, startSystem, submit, waitTerminal, type System } from '../support/reliability.js';

/**
 * Backing services that go away, with real processes: Redis and Postgres restarted under steady
 * submissions, Redis down while a POST commits its row, and storage cut during uploads.
 */

let sys: System;
const report: Record<string, unknown> = {};

beforeAll(async () => {
  sys = await startSystem('t2i-outages');
}, 120_000);
afterEach(async () => {
  await sys.stopProcesses();
});
afterAll(async () => {
  await sys?.stop();
  saveReport(report);
}, 60_000);

/** The README promises an answer within a second while Postgres or Redis is down. */
const ANSWER_BOUND_MS = 1_000;
/** Redis back → queued rows enqueued again: after RECONCILE_QUEUED_AFTER_MS, at the next reconcile pass, plus the jobs' own time. */
const REDIS_BACK_BOUND_MS = Number(FAST.RECONCILE_QUEUED_AFTER_MS) + Number(FAST.RECONCILE_INTERVAL_MS) + 5_000;

describe('outages, with real processes', () => {
  it(`1. Redis and Postgres restarts under steady submissions: every answer within ${ANSWER_BOUND_MS} ms, no 500, nothing lost`, async () => {
    const { proc: api, url } = await sys.startApiProcess();
    await sys.startWorkerProcess('restart-a');
    const accepted: string[] = [];
    const statuses = new Map<number, number>();
    const answerMs: number[] = [];
    let running = true;
    /** Called after every answer (or timeout), so phases can wait for answers instead of sleeping. */
    const onAnswer = new Set<() => void>();
    /** Resolves once `n` more POSTs were accepted (201), failing after `timeoutMs`. */
    const moreAccepted = (n: number, what: string, timeoutMs = 30_000) =>
      new Promise<void>((resolve, reject) => {
        const target = accepted.length + n;
        const check = () => {
          if (accepted.length < target) return;
          clearTimeout(timer);
          onAnswer.delete(check);
          resolve();
        };
        const timer = setTimeout(() => {
          onAnswer.delete(check);
          reject(new Error(`${what}: fewer than ${n} POSTs accepted in ${timeoutMs} ms (statuses so far ${JSON.stringify(Object.fromEntries(statuses))})`));
        }, timeoutMs);
        onAnswer.add(check);
      });
    const load = (async () => {
      while (running) {
        const t0 = Date.now();
        try {
          const r = await fetch(`${url}/generated-images`, {
            method: 'POST',
            headers: { ...sys.auth, 'content-type': 'application/json' },
            body: JSON.stringify({ prompt: 'restart test', num_steps: 5 }),
            signal: AbortSignal.timeout(5_000),
          });
          statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
          if (r.status === 201) accepted.push(((await r.json()) as { id: string }).id);
          else expect(r.headers.get('content-type')).toContain('application/problem+json');
        } catch {
          statuses.set(0, (statuses.get(0) ?? 0) + 1); // no answer within 5 s: a hang
        }
        answerMs.push(Date.now() - t0);
        for (const f of [...onAnswer]) f();
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    // Each outage: the system is accepting jobs, the service is down for OUTAGE_MS under the
    // steady submissions (the scenario itself, hence a fixed duration), and once it is back the
    // API must accept jobs again, without any process being restarted.
    const OUTAGE_MS = 3_000;
    const outage = async (name: 'redis' | 'postgres') => {
      await moreAccepted(5, `before the ${name} outage`);
      await sys.services.stopService(name);
      await new Promise((r) => setTimeout(r, OUTAGE_MS));
      await sys.services.startService(name);
      await moreAccepted(5, `after ${name} came back`);
    };
    await outage('redis');
    await outage('postgres');
    running = false;
    await load;
    for (const l of api.lines) if (l.msg === 'request failed') console.log('500 from the api:', JSON.stringify(l).slice(0, 3000));
    expect(statuses.get(0) ?? 0, 'requests with no answer in 5 s').toBe(0);
    expect(statuses.get(500) ?? 0, '500 responses').toBe(0);
    expect(statuses.get(503) ?? 0, '503 responses while a service was down').toBeGreaterThan(0);
    expect(Math.max(...answerMs), 'slowest answer').toBeLessThanOrEqual(ANSWER_BOUND_MS);
    expect(sys.procs.every((p) => p.running)).toBe(true);
    // Accepted before, during and after: all done, including jobs Redis forgot when it restarted empty.
    await waitTerminal(sys.db, accepted, 90_000);
    const counts = await expectEachSucceededOnce(sys, accepted);
    report.restarts = {
      submitted: [...statuses.values()].reduce((a, b) => a + b, 0),
      accepted: accepted.length,
      statuses: Object.fromEntries(statuses),
      lost: counts.lost,
      runTwice: counts.runTwice,
      slowestAnswerMs: Math.max(...answerMs),
      bound: ANSWER_BOUND_MS,
    };
  });

  it(`2. enqueueing fails after the row is committed (Redis down during POST): the reconciler gets the jobs done within ${REDIS_BACK_BOUND_MS} ms of Redis returning`, async () => {
    const { url } = await sys.startApiProcess();
    await sys.startWorkerProcess('reconcile-a');
    await sys.services.stopService('redis');
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(await submit(url, { prompt: `redis down ${i}`, num_steps: 3 }, sys.auth));
    for (const id of ids) expect((await sys.repo.get(id))?.status).toBe('queued');
    const back = Date.now();
    await sys.services.startService('redis');
    await waitTerminal(sys.db, ids, 30_000);
    const doneMs = Date.now() - back;
    const counts = await expectEachSucceededOnce(sys, ids);
    expect(doneMs).toBeLessThanOrEqual(REDIS_BACK_BOUND_MS);
    report.enqueueFailure = { jobs: ids.length, lost: counts.lost, redisBackToAllDoneMs: doneMs, bound: REDIS_BACK_BOUND_MS };
  });

  it('3. storage unavailable during uploads: retries, then success or a clear failure; never succeeded without the object, no internals shown', async () => {
    const proxy = new CuttableProxy(sys.services.s3.port);
    await proxy.start();
    try {
      // Attempts and backoff are set when the API enqueues.
      const { url } = await sys.startApiProcess({ JOB_ATTEMPTS: '3', JOB_BACKOFF_MS: '500' });
      const w = await sys.startWorkerProcess('storage-a', { STORAGE_ENDPOINT: `http://127.0.0.1:${proxy.port}` });
      // A short outage: attempts fail, a retry succeeds.
      proxy.sever();
      const recovering = await submit(url, { prompt: 'storage blip', num_steps: 2 }, sys.auth);
      await w.waitForLine((l) => l.jobId === recovering && l.code === 'storage_unavailable', 20_000);
      proxy.restore();
      await waitTerminal(sys.db, [recovering], 30_000);
      await expectEachSucceededOnce(sys, [recovering]);
      // A long outage: every attempt fails and the job says why, in public words.
      proxy.sever();
      const doomed = await submit(url, { prompt: 'storage gone', num_steps: 2 }, sys.auth);
      await waitTerminal(sys.db, [doomed], 30_000);
      const job = (await (await fetch(`${url}/generated-images/${doomed}`, { headers: sys.auth })).json()) as {
        status: string;
        file_name: string | null;
        error: { code: string; message: string };
      };
      expect(job).toMatchObject({
        status: 'failed',
        file_name: null,
        error: { code: 'storage_unavailable', message: 'The image was generated but could not be stored.' },
      });
      const shown = JSON.stringify(job) + (await (await fetch(`${url}/generated-images/${doomed}/url`, { headers: sys.auth })).text());
      expect(shown).not.toMatch(new RegExp(`127\\.0\\.0\\.1|:${proxy.port}|ECONN|STORAGE_|storage:`));
      // The operator sees the details in the worker's log.
      expect(w.lines.some((l) => l.jobId === doomed && JSON.stringify(l).includes(`127.0.0.1:${proxy.port}`))).toBe(true);
      proxy.restore();
      const succeeded = await sys.db.generatedImage.findMany({ where: { status: 'succeeded' } });
      let withoutObject = 0;
      for (const r of succeeded) if (!r.fileName || !(await sys.storage.stat(r.fileName))) withoutObject++;
      expect(withoutObject).toBe(0);
      const attemptsOfDoomed = await sys.repo.attempts(doomed);
      expect(attemptsOfDoomed.map((a) => a.outcome)).toEqual(['retried', 'retried', 'failed']);
      report.storageOutage = {
        shortOutage: (await sys.repo.get(recovering))?.status,
        longOutage: job.error.code,
        attemptsOfLongOutage: attemptsOfDoomed.length,
        succeededWithoutObject: withoutObject,
      };
    } finally {
      proxy.restore();
      await proxy.close();
    }
  });
});
