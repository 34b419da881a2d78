import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { objectKeyFor } from '../../src/adapters/storage.js';
import { CuttableProxy, saveReport, type ServiceProcess } from '../support/processes.js';
import { expectEachSucceededOnce, FAST, median, pollFor, startSystem, submit, waitTerminal, type System } from '../support/reliability.js';

/**
 * Workers that die or freeze, as real processes: SIGKILL in the middle of jobs, and SIGSTOP past
 * the lock, including while an upload is in flight. Every job ends with exactly one result (one
 * successful result write, one object) and nothing a stale attempt writes survives.
 */

let sys: System;
const report: Record<string, unknown> = {};

beforeAll(async () => {
  sys = await startSystem('t2i-crashes');
}, 120_000);
afterEach(async () => {
  await sys.stopProcesses();
});
afterAll(async () => {
  await sys?.stop();
  saveReport(report);
}, 60_000);

/** kill → running again: the lock must expire and a stalled check run; another worker may still be finishing a job. */
const RECOVERY_BOUND_MS = Number(FAST.JOB_LOCK_MS) + Number(FAST.JOB_STALLED_INTERVAL_MS) + 2_000;

describe('crashes, with real processes', () => {
  it(`1. SIGKILLed workers: every job still succeeds exactly once; kill → running again within ${RECOVERY_BOUND_MS} ms`, async () => {
    const { url } = await sys.startApiProcess();
    const all: ServiceProcess[] = [];
    let generation = 0;
    const live = new Map<string, ServiceProcess>();
    for (const slot of ['a', 'b']) {
      const w = await sys.startWorkerProcess(`kill-${slot}-${generation}`);
      live.set(slot, w);
      all.push(w);
    }
    const ids: string[] = [];
    for (let i = 0; i < 24; i++) ids.push(await submit(url, { prompt: `kill test ${i}`, num_steps: 20 }, sys.auth));

    const recoveries: number[] = [];
    for (let kill = 0; recoveries.length < 4 && kill < 8; kill++) {
      // Find a worker in the middle of a job, and kill it.
      const victim = await pollFor(async () => {
        const row = await sys.db.generatedImage.findFirst({ where: { id: { in: ids }, status: 'running', progress: { gt: 10 } } });
        const slot = row && [...live].find(([, w]) => w.name === row.workerId)?.[0];
        if (row && slot) return { row, slot };
        const open = await sys.db.generatedImage.count({ where: { id: { in: ids }, status: { in: ['queued', 'running'] } } });
        return open === 0 ? null : undefined;
      }, 20_000);
      if (!victim) break;
      const killedAt = Date.now();
      live.get(victim.slot)!.kill('SIGKILL');
      generation++;
      const replacement = await sys.startWorkerProcess(`kill-${victim.slot}-${generation}`);
      live.set(victim.slot, replacement);
      all.push(replacement);
      // Recovered when another attempt is running (or has finished) the job. If the victim
      // finished it in the moment before the kill landed, there is nothing to recover.
      const outcome = await pollFor(async () => {
        const r = await sys.db.generatedImage.findUnique({ where: { id: victim.row.id } });
        if (!r) return undefined;
        if (r.attempts > victim.row.attempts) return 'recovered';
        if (r.status === 'succeeded') return 'finished before the kill';
        return undefined;
      }, 30_000);
      if (outcome !== 'recovered') continue;
      recoveries.push(Date.now() - killedAt);
    }
    await waitTerminal(sys.db, ids, 60_000);
    const counts = await expectEachSucceededOnce(sys, ids);
    expect(recoveries.length).toBeGreaterThanOrEqual(3);
    expect(Math.max(...recoveries)).toBeLessThanOrEqual(RECOVERY_BOUND_MS);
    report.sigkill = {
      ...counts,
      kills: recoveries.length,
      recoveryMs: { median: median(recoveries), max: Math.max(...recoveries), bound: RECOVERY_BOUND_MS, all: recoveries },
    };
  });

  it('2. a SIGSTOPped worker that wakes after its job moved on cannot overwrite the result', async () => {
    const { url } = await sys.startApiProcess();
    const stale = await sys.startWorkerProcess('stop-a');
    const id = await submit(url, { prompt: 'stop test', num_steps: 50 }, sys.auth);
    await pollFor(async () => ((await sys.repo.get(id))?.progress ?? 0) > 5 || undefined, 20_000);
    stale.kill('SIGSTOP');
    const stoppedAt = Date.now();
    const fresh = await sys.startWorkerProcess('stop-b');
    await pollFor(async () => ((await sys.repo.get(id))?.status === 'succeeded' ? true : undefined), 30_000);
    const takeoverMs = Date.now() - stoppedAt;
    stale.kill('SIGCONT');
    // The stale attempt learns at its next progress write that it no longer owns the job.
    await stale.waitForLine((l) => l.jobId === id && l.outcome === 'superseded', 20_000);
    const row = (await sys.repo.get(id))!;
    expect(row).toMatchObject({ status: 'succeeded', workerId: 'stop-b', attempts: 2, progress: 100 });
    const counts = await expectEachSucceededOnce(sys, [id]);
    const attempts = await sys.repo.attempts(id);
    expect(attempts.map((a) => [a.workerId, a.outcome])).toEqual([
      ['stop-a', 'superseded'],
      ['stop-b', 'succeeded'],
    ]);
    // Takeover, then the whole job again on the fresh worker (50 steps of 40 ms).
    const boundMs = RECOVERY_BOUND_MS + 50 * 40 + 2_000;
    expect(takeoverMs).toBeLessThanOrEqual(boundMs);
    report.sigstop = {
      boundMs,
      results: counts.jobs - counts.lost,
      staleAttemptsRefused: attempts.filter((a) => a.outcome === 'superseded').length,
      stopToResultMs: takeoverMs,
    };
    await Promise.all([stale.stop(), fresh.stop()]);
  });

  it('3. a worker frozen in the middle of its upload, then resumed: its late object is removed, the URL serves the winner’s', async () => {
    // The stale worker reaches S3 through a proxy that holds its upload in flight.
    const proxy = new CuttableProxy(sys.services.s3.port);
    await proxy.start();
    try {
      const { url } = await sys.startApiProcess();
      const stale = await sys.startWorkerProcess('upload-a', { STORAGE_ENDPOINT: `http://127.0.0.1:${proxy.port}` }, 5);
      proxy.hold();
      const id = await submit(url, { prompt: 'frozen upload', num_steps: 10, seed: 7 }, sys.auth);
      // The generation is done and its PUT has reached the proxy: freeze the worker there.
      await pollFor(async () => (proxy.heldBytes() > 200 ? true : undefined), 20_000);
      stale.kill('SIGSTOP');
      const fresh = await sys.startWorkerProcess('upload-b', {}, 5);
      await pollFor(async () => ((await sys.repo.get(id))?.status === 'succeeded' ? true : undefined), 30_000);
      const winner = await fetch((await sys.storage.presignGet(objectKeyFor(id, 2))).url);
      const winnerBytes = Buffer.from(await winner.arrayBuffer());
      // Resume the stale worker and let its upload through: it lands under its own key, the
      // fenced success refuses it, and the stale attempt removes its object.
      stale.kill('SIGCONT');
      proxy.release();
      await stale.waitForLine((l) => l.jobId === id && l.outcome === 'superseded', 30_000);
      const row = (await sys.repo.get(id))!;
      expect(row).toMatchObject({ status: 'succeeded', workerId: 'upload-b', fileName: objectKeyFor(id, 2) });
      const counts = await expectEachSucceededOnce(sys, [id]);
      const api = await fetch(`${url}/generated-images/${id}/url`, { headers: sys.auth });
      const served = Buffer.from(await (await fetch(((await api.json()) as { url: string }).url)).arrayBuffer());
      expect(served.equals(winnerBytes)).toBe(true);
      expect((await sys.repo.attempts(id)).map((a) => a.outcome)).toEqual(['superseded', 'succeeded']);
      const objects = await sys.storage.list(`images/${id}/`);
      report.staleUpload = { results: counts.jobs - counts.lost, objects: objects.length, staleObjectRemoved: !objects.includes(objectKeyFor(id, 1)) };
      await Promise.all([stale.stop(), fresh.stop()]);
    } finally {
      proxy.release();
      await proxy.close();
    }
  });
});
