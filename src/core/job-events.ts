import type { Failure } from './failures.js';

/**
 * What happens to a job, as a sequence of events clients can follow live (SSE, WebSocket).
 *
 * Workers and API instances append events to a per-job log (src/adapters/job-events.ts: a Redis
 * stream, plus pub/sub for live delivery), so any API instance can stream any job whichever
 * worker runs it. Every stored event has an id, ordered within the job (Redis stream ids):
 * clients resume with Last-Event-ID and lose nothing. The log is a convenience with an expiry;
 * the job row in Postgres stays the truth, and readers fall back to it (job-event-stream.ts).
 *
 * Events carry no prompt and no internal detail: only status, numbers, public failure messages
 * and small previews.
 */

export type StoredEvent =
  /** The job's status changed: queued (created, retrying or handed back), running (an attempt started). */
  | { type: 'status'; status: 'queued' | 'running'; attempt?: number; error?: Failure }
  | {
      type: 'progress';
      attempt: number;
      step: number;
      total: number;
      /** 0..100, floored. */
      percent: number;
      /** Estimated time to the end of denoising from the mean step time so far, in ms. */
      eta_ms: number;
    }
  | {
      type: 'preview';
      attempt: number;
      step: number;
      total: number;
      /** A small picture of the latents (about 128 px on its longer side). */
      content_type: 'image/webp';
      width: number;
      height: number;
      /** The picture's bytes, base64. */
      data: string;
    }
  | { type: 'succeeded' }
  | { type: 'failed'; error: Failure }
  | { type: 'canceled' };

/** An event with its envelope: `at` is the writer's wall clock in epoch milliseconds (fractional). */
export type JobEvent = StoredEvent & { at: number };

export type TerminalType = 'succeeded' | 'failed' | 'canceled';

export function isTerminal(e: StoredEvent): e is Extract<StoredEvent, { type: TerminalType }> {
  return e.type === 'succeeded' || e.type === 'failed' || e.type === 'canceled';
}

export interface LoggedEvent {
  /** Ordered within the job; what a client sends back as Last-Event-ID. */
  id: string;
  event: JobEvent;
}

/** Writes to a job's event log. Publishing is best effort: it never fails the caller's work. */
export interface JobEventSink {
  /**
   * Stamps the event with the time of this call (or `at`, when the event happened earlier) and
   * appends it after every event published before it. The returned promise settles once the
   * event is written or given up on; it never rejects.
   */
  publish(imageId: string, event: StoredEvent, at?: number): Promise<void>;
}

/** The log as readers see it. */
export interface JobEventLog {
  /** Events after `afterId` (exclusive; from the start when null), oldest first, at most `limit`. */
  read(imageId: string, afterId: string | null, limit: number): Promise<LoggedEvent[]>;
  /**
   * Live events of a job from now on, until the returned function is called. Resolves once the
   * subscription is in place, so a read made after it misses nothing.
   */
  subscribe(imageId: string, listener: (e: LoggedEvent) => void): Promise<() => void>;
}

/** Stream ids are "<ms>-<seq>"; true when a is later than b. */
export function eventIdAfter(a: string, b: string): boolean {
  const [am = 0, as = 0] = a.split('-').map(Number);
  const [bm = 0, bs = 0] = b.split('-').map(Number);
  return am > bm || (am === bm && as > bs);
}

/** The form of an id clients may send back (Last-Event-ID), so junk never reaches Redis. */
export const EVENT_ID = /^\d{1,15}-\d{1,10}$/;

/** The writer's wall clock in epoch milliseconds, to 1 µs: stream latency is measured against it. */
export function eventTime(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000) / 1000;
}

/**
 * A sink that writes events in the order they were published, one write at a time, so a slow
 * write (a preview) cannot be overtaken by a later event. Events published while a write is
 * in flight go together in the next one (one round trip for a whole admitted batch, or for the
 * steps of several jobs). Errors are reported with the number of events lost, not thrown.
 */
export function orderedSink(
  write: (events: Array<{ imageId: string; event: JobEvent }>) => Promise<unknown>,
  onError: (err: unknown, lost: number) => void,
): JobEventSink & { flush(): Promise<void> } {
  let chain: Promise<void> = Promise.resolve();
  let pending: Array<{ imageId: string; event: JobEvent }> = [];
  // The write that will take `pending`, once the writes before it are done.
  let next: Promise<void> | undefined;
  return {
    /** Resolves once every event published so far is written or given up on (before closing the store). */
    flush: () => chain,
    publish(imageId, event, at = eventTime()) {
      pending.push({ imageId, event: { ...event, at } });
      if (next === undefined) {
        next = chain.then(async () => {
          const events = pending;
          pending = [];
          next = undefined;
          try {
            await write(events);
          } catch (err) {
            onError(err, events.length);
          }
        });
        chain = next;
      }
      return next;
    },
  };
}
