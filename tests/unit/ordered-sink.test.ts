import { describe, expect, it } from 'vitest';
import { orderedSink, type JobEvent, type StoredEvent } from '../../src/core/job-events.js';

/** A fake store write (unit test): records each call's events and settles when the test says. */
function fakeWrites() {
  const calls: Array<{ events: string[]; settle: (err?: Error) => void }> = [];
  const write = (events: Array<{ imageId: string; event: JobEvent }>) =>
    new Promise<void>((resolve, reject) => {
      calls.push({
        events: events.map((e) => `${e.imageId}:${e.event.type === 'progress' ? e.event.step : e.event.type}`),
        settle: (err) => (err ? reject(err) : resolve()),
      });
    });
  return { calls, write };
}

const step = (n: number): StoredEvent => ({ type: 'progress', attempt: 1, step: n, total: 10, percent: n * 10, eta_ms: 0 });
const tick = () => new Promise((r) => setImmediate(r));

describe('orderedSink (fake writes)', () => {
  it('writes one group at a time, in publish order; what arrives meanwhile goes in the next group', async () => {
    const { calls, write } = fakeWrites();
    const sink = orderedSink(write, () => undefined);
    const first = [sink.publish('a', step(1)), sink.publish('b', step(1))];
    await tick();
    expect(calls.map((c) => c.events)).toEqual([['a:1', 'b:1']]);
    // Published while the first write is in flight: held, then written together.
    const second = [sink.publish('a', step(2)), sink.publish('c', step(1)), sink.publish('b', step(2))];
    await tick();
    expect(calls).toHaveLength(1);
    calls[0]!.settle();
    await Promise.all(first);
    await tick();
    expect(calls.map((c) => c.events)).toEqual([
      ['a:1', 'b:1'],
      ['a:2', 'c:1', 'b:2'],
    ]);
    let secondDone = false;
    void Promise.all(second).then(() => (secondDone = true));
    await tick();
    expect(secondDone).toBe(false);
    calls[1]!.settle();
    await sink.flush();
    await tick();
    expect(secondDone).toBe(true);
  });

  it('reports a failed write with the number of events it lost, never rejects, and goes on', async () => {
    const { calls, write } = fakeWrites();
    const errors: Array<[string, number]> = [];
    const sink = orderedSink(write, (err, lost) => errors.push([(err as Error).message, lost]));
    const lost = [sink.publish('a', step(1)), sink.publish('a', step(2)), sink.publish('b', step(1))];
    await tick();
    calls[0]!.settle(new Error('redis away'));
    await expect(Promise.all(lost)).resolves.toEqual([undefined, undefined, undefined]);
    expect(errors).toEqual([['redis away', 3]]);
    const later = sink.publish('a', step(3));
    await tick();
    calls[1]!.settle();
    await later;
    expect(calls.map((c) => c.events)).toEqual([['a:1', 'a:2', 'b:1'], ['a:3']]);
  });
});
