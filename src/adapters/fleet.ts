import type { FleetMember, FleetRegistry } from '../core/fleet.js';
import { createRedis, translateRedisError } from './queue.js';
import { translateErrors } from './translate.js';

/**
 * The fleet's announcements in Redis: one hash per queue, a field per worker holding its
 * announcement and when it expires. Readers skip expired fields; writers delete them.
 */
export function createFleetRegistry(redisUrl: string, queueName: string): FleetRegistry & { close(): void } {
  // Commands wait for the connection (a worker announces itself right after starting); readers bound their wait themselves.
  const redis = createRedis(redisUrl);
  const key = `t2i:fleet:${queueName}`;
  const parse = (raw: string): { member: FleetMember; expiresAt: number } | null => {
    try {
      return JSON.parse(raw) as { member: FleetMember; expiresAt: number };
    } catch {
      return null;
    }
  };
  const registry: FleetRegistry = {
    async announce(member, ttlMs) {
      await redis.hset(key, member.workerId, JSON.stringify({ member, expiresAt: Date.now() + ttlMs }));
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
  };
  return { ...translateErrors(registry, translateRedisError), close: () => redis.disconnect() };
}
