import type { Redis } from 'ioredis';
import { withTimeout } from '../core/lifecycle.js';
import { orderedSink, type JobEvent, type JobEventLog, type JobEventSink, type LoggedEvent } from '../core/job-events.js';
import { createRedis, translateRedisError } from './queue.js';
import { asError, translateErrors } from './translate.js';

/**
 * Job events on Redis (the ioredis client comes from queue.ts, the one module that builds Redis
 * connections). Each job has a stream `<ns>:<image id>` holding its events, capped and expiring
 * EVENTS_RETENTION_SECONDS after the last one (previews included: they are never stored
 * elsewhere), and a pub/sub channel of the same name that carries each event once it is in the
 * stream. One Lua script appends, sets the expiry and publishes, so the channel never announces
 * an event the stream does not have, in the stream's order.
 *
 * Readers subscribe first, then read the stream: nothing published in between is missed, and
 * duplicates are dropped by id. Pub/sub loses what is published while a subscriber is
 * disconnected; readers re-read the stream periodically for that (job-event-stream.ts).
 */

export interface JobEventStoreOptions {
  /** Key prefix; the queue name goes in it so deployments (and test files) sharing a Redis stay apart. */
  namespace: string;
  /** Events kept per job (approximately: Redis trims whole nodes). Previews at 2/s for 10 minutes are 1,200. */
  maxLen: number;
  /** The stream expires this long after its last event. */
  ttlMs: number;
}

export interface JobEventStore {
  /** Appends events in order, in one round trip; resolves once all are written, rejects if any is not. */
  appendMany(events: ReadonlyArray<{ imageId: string; event: JobEvent }>): Promise<void>;
  log: JobEventLog;
  close(): Promise<void>;
}

// KEYS[1] stream (also the channel); ARGV: maxlen, ttl ms, event json. Returns the new id.
const APPEND = `
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], id .. ' ' .. ARGV[3])
return id`;

type StreamEntries = Array<[string, string[]]>;

function parseEntry(id: string, fields: string[]): LoggedEvent | null {
  const i = fields.indexOf('e');
  const json = i >= 0 ? fields[i + 1] : undefined;
  if (json === undefined) return null;
  try {
    return { id, event: JSON.parse(json) as JobEvent };
  } catch {
    return null;
  }
}

export function createJobEventStore(redisUrl: string, opts: JobEventStoreOptions): JobEventStore {
  const key = (imageId: string) => `${opts.namespace}:${imageId}`;
  // Commands fail fast while Redis is away (publishing is best effort; readers answer 503).
  const commands = createRedis(redisUrl, { failFast: true });
  commands.defineCommand('t2iAppendEvent', { numberOfKeys: 1, lua: APPEND });
  type Appender = { t2iAppendEvent(k: string, ...a: Array<string | number>): unknown };

  // One subscriber connection per process, shared by every reader of every job; ioredis
  // subscribes again by itself after a reconnect.
  let subscriber: Redis | undefined;
  const listeners = new Map<string, Set<(e: LoggedEvent) => void>>();
  const subscriberConn = (): Redis => {
    if (subscriber) return subscriber;
    const s = createRedis(redisUrl);
    s.on('message', (channel: string, message: string) => {
      const set = listeners.get(channel);
      if (!set) return;
      const space = message.indexOf(' ');
      const entry = parseEntry(message.slice(0, space), ['e', message.slice(space + 1)]);
      if (entry) for (const l of set) l(entry);
    });
    // Errors are retried by ioredis; without a listener they would be thrown as unhandled events.
    s.on('error', () => undefined);
    subscriber = s;
    return s;
  };

  const log: JobEventLog = {
    async read(imageId, afterId, limit) {
      const raw = (await commands.xrange(key(imageId), afterId ? `(${afterId}` : '-', '+', 'COUNT', limit)) as StreamEntries;
      return raw.map(([id, fields]) => parseEntry(id, fields)).filter((e): e is LoggedEvent => e !== null);
    },
    async subscribe(imageId, listener) {
      const channel = key(imageId);
      let set = listeners.get(channel);
      if (!set) {
        set = new Set();
        listeners.set(channel, set);
      }
      set.add(listener);
      try {
        await subscriberConn().subscribe(channel);
      } catch (err) {
        set.delete(listener);
        throw err;
      }
      return () => {
        const current = listeners.get(channel);
        if (!current) return;
        current.delete(listener);
        if (current.size === 0) {
          listeners.delete(channel);
          // The last reader of this job on this process left.
          void subscriber?.unsubscribe(channel).catch(() => undefined);
        }
      };
    },
  };

  return {
    async appendMany(events) {
      const pipeline = commands.pipeline();
      for (const { imageId, event } of events) (pipeline as unknown as Appender).t2iAppendEvent(key(imageId), opts.maxLen, opts.ttlMs, JSON.stringify(event));
      const results = (await pipeline.exec()) ?? [];
      const failed = results.find(([err]) => err !== null);
      if (failed) throw asError(failed[0]);
    },
    log: translateErrors(log, translateRedisError),
    async close() {
      listeners.clear();
      commands.disconnect();
      subscriber?.disconnect();
    },
  };
}

/** Longest one event write may take: a Redis that stopped answering must not stall the events behind it for long. */
const WRITE_TIMEOUT_MS = 2_000;

/**
 * The sink a process publishes through: ordered writes to the store, each bounded in time. A
 * failed write is logged at most every 10 s (a Redis outage would otherwise log every step).
 */
export function eventSink(store: Pick<JobEventStore, 'appendMany'>, log: { warn(obj: object, msg: string): void }): JobEventSink & { flush(): Promise<void> } {
  let lastWarn = Number.NEGATIVE_INFINITY;
  let dropped = 0;
  return orderedSink(
    (events) => withTimeout(store.appendMany(events), WRITE_TIMEOUT_MS, 'publishing job events'),
    (err, lost) => {
      dropped += lost;
      if (performance.now() - lastWarn < 10_000) return;
      lastWarn = performance.now();
      log.warn({ err, dropped }, 'could not publish job events; live streams fall back to the job rows');
      dropped = 0;
    },
  );
}
