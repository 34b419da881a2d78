import { MODEL_TASKS, type FleetMember, type FleetRegistry, type ModelProfile, type ModelTask } from '../core/fleet.js';
import { createRedis, translateRedisError, whenReady } from './queue.js';
import { translateErrors } from './translate.js';

/**
 * The fleet's announcements in Redis, per deployment (QUEUE_NAME): one hash with a field per
 * worker holding its announcement and when it expires (readers skip expired fields, writers
 * delete them), and one hash with a field per model holding the last profile announced for it,
 * which outlives the model's workers (a model scaled to zero keeps its defaults).
 */
export function createFleetRegistry(
  redisUrl: string,
  queueName: string,
  opts: { failFast?: boolean } = {},
): FleetRegistry & { ready(timeoutMs?: number): Promise<void>; close(): void } {
  // A worker's commands wait for the connection (it announces itself right after starting). The
  // API's fail at once while Redis is away (failFast), so a request never waits on the fleet: the
  // model catalog answers from its last read instead.
  const redis = createRedis(redisUrl, opts);
  if (opts.failFast) redis.on('error', () => undefined);
  const key = `t2i:fleet:${queueName}`;
  const profilesKey = `t2i:fleet:${queueName}:profiles`;
  const parse = (raw: string): { member: FleetMember; expiresAt: number } | null => {
    try {
      const e = JSON.parse(raw) as { member: FleetMember; expiresAt: number };
      return { ...e, member: withTasks(e.member) };
    } catch {
      return null;
    }
  };
  const registry: FleetRegistry = {
    async announce(member, ttlMs) {
      const profile: ModelProfile = {
        model: member.model,
        variant: member.variant,
        defaults: member.defaults,
        schedulers: member.schedulers,
        tasks: member.tasks,
      };
      await redis
        .multi()
        .hset(key, member.workerId, JSON.stringify({ member, expiresAt: Date.now() + ttlMs }))
        .hset(profilesKey, member.model, JSON.stringify(profile))
        .exec();
      const all = await redis.hgetall(key);
      const expired = Object.entries(all).filter(([, v]) => (parse(v)?.expiresAt ?? 0) < Date.now());
      if (expired.length > 0) await redis.hdel(key, ...expired.map(([k]) => k));
    },
    async withdraw(workerId) {
      await redis.hdel(key, workerId);
    },
    async members() {
      const all = await redis.hgetall(key);
      return Object.values(all)
        .map(parse)
        .filter((e): e is { member: FleetMember; expiresAt: number } => e !== null && e.expiresAt >= Date.now())
        .map((e) => e.member);
    },
    async profiles() {
      const all = await redis.hgetall(profilesKey);
      return Object.values(all).flatMap((raw) => {
        try {
          return [withTasks(JSON.parse(raw) as ModelProfile)];
        } catch {
          return [];
        }
      });
    },
  };
  return { ...translateErrors(registry, translateRedisError), ready: (timeoutMs = 10_000) => whenReady(redis, timeoutMs), close: () => redis.disconnect() };
}

/** Announcements of workers older than task lists, read as text-to-image only (what they could do). */
function withTasks<T extends { tasks?: readonly ModelTask[] | undefined }>(m: T): T & { tasks: readonly ModelTask[] } {
  const listed: unknown = m.tasks;
  const tasks = Array.isArray(listed) ? MODEL_TASKS.filter((t) => (listed as unknown[]).includes(t)) : (['text-to-image'] as const);
  return { ...m, tasks };
}
