import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { AccountsService, AuthFailure, Principal } from '../core/accounts.js';
import { RateLimitedError, UnauthorizedError } from '../core/errors.js';

/**
 * Who is calling, and how often they may: the hook that every tenant-scoped route runs first.
 *
 *  1. An address that failed to authenticate AUTH_FAILURE_LIMIT times in the window gets 429 for
 *     the rest of it, before any key it sends is looked at: guessing keys stays slow even for a
 *     guess that happens to be right.
 *  2. The key is checked (src/core/accounts.ts): missing, malformed, unknown or revoked keys get
 *     401 problem+json, and count against the address.
 *  3. The key's own limit (RATE_LIMIT_MAX per RATE_LIMIT_WINDOW_MS): 429 with Retry-After past it.
 *
 * Counters live in Redis through @fastify/rate-limit's store (a fixed window that starts with its
 * first request, INCR + PEXPIRE in one script), so every API process shares them and a limit
 * holds in total, not per process. If Redis is unreachable the limits are skipped (and logged)
 * rather than failing every request: the API keeps serving what Postgres can answer.
 */

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by the auth hook on every tenant-scoped route; null elsewhere. */
    principal: Principal | null;
  }
}

export interface RateLimitOptions {
  /** An ioredis client (src/adapters/queue.ts createRedis), shared by every API process; in-memory when absent. */
  redis?: unknown;
  /** Prefix of the counters' Redis keys. */
  namespace: string;
  /** Requests per key per window; 0 = no limit. */
  perKey: { max: number; windowMs: number };
  /** Failed authentications per client address per window. */
  authFailures: { max: number; windowMs: number };
}

export interface AuthOptions {
  accounts: AccountsService;
  /** 'off': no keys; every request is the anonymous tenant (allowed on loopback only, see src/api/main.ts). */
  mode: 'required' | 'off';
  /** No limits when absent (tests of other things build the app without them). */
  rateLimits?: RateLimitOptions | undefined;
}

const DETAILS: Record<AuthFailure, string> = {
  missing: 'This route needs an API key: send "Authorization: Bearer <key>". Keys are made with `t2i keys create`.',
  malformed: 'The Authorization header is not "Bearer <key>" with a t2i API key (t2i_<prefix>_<secret>).',
  // Unknown and revoked keys read the same: the answer must not say which keys ever existed.
  invalid: 'The API key is not valid: it is unknown or has been revoked.',
};

type Check = ReturnType<FastifyInstance['createRateLimit']>;

/** The standard rate-limit fields (draft-ietf-httpapi-ratelimit-headers), and Retry-After once exceeded. */
function limitHeaders(max: number, windowMs: number, remaining: number, ttlMs: number, exceeded: boolean): Record<string, string> {
  const reset = String(Math.max(1, Math.ceil(ttlMs / 1000)));
  return {
    'ratelimit-limit': String(max),
    'ratelimit-remaining': String(Math.max(0, remaining)),
    'ratelimit-reset': reset,
    'ratelimit-policy': `${max};w=${Math.ceil(windowMs / 1000)}`,
    ...(exceeded ? { 'retry-after': reset } : {}),
  };
}

/**
 * Adds the auth hook to `scope` (the plugin holding the tenant-scoped routes). Registers
 * @fastify/rate-limit on the app first when limits are configured; call before the routes.
 */
export async function registerAuth(scope: FastifyInstance, opts: AuthOptions): Promise<void> {
  scope.decorateRequest('principal', null);
  const limits = opts.rateLimits;
  let perKey: Check | undefined;
  let failures: Check | undefined;
  if (limits) {
    await scope.register(rateLimit, {
      global: false,
      ...(limits.redis ? { redis: limits.redis } : {}),
      nameSpace: limits.namespace,
      // Errors reach us instead, to be logged (the plugin would skip them silently).
      skipOnError: false,
    });
    if (limits.perKey.max > 0) {
      perKey = scope.createRateLimit({
        max: limits.perKey.max,
        timeWindow: limits.perKey.windowMs,
        // The key's id, never the key: Redis must not hold secrets.
        keyGenerator: (req) => (req.principal?.keyId ? `key:${req.principal.keyId}` : `anonymous:${req.ip}`),
      });
    }
    failures = scope.createRateLimit({
      max: limits.authFailures.max,
      timeWindow: limits.authFailures.windowMs,
      keyGenerator: (req) => `auth-failures:${req.ip}`,
    });
  }

  let lastStoreWarning = 0;
  /** The counter's answer, or null when its store (Redis) failed: then nothing is limited. */
  const consult = async (check: Check, request: FastifyRequest, increment: boolean) => {
    try {
      return await check(request, { increment });
    } catch (err) {
      // At most one line per 10 s: an outage must not turn every request into a log line.
      if (Date.now() - lastStoreWarning > 10_000) {
        lastStoreWarning = Date.now();
        request.log.warn({ err }, 'rate-limit store unavailable; requests are not being limited');
      }
      return null;
    }
  };

  const anonymous = opts.mode === 'off' ? await opts.accounts.anonymous() : undefined;

  scope.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (anonymous) {
      request.principal = anonymous;
    } else {
      if (failures && limits) {
        // Cut off once the address has used up its failures: the next key is not even looked at.
        const seen = await consult(failures, request, false);
        if (seen && !seen.isAllowed && seen.remaining <= 0) {
          throw new RateLimitedError(
            'Too many requests from this address failed to authenticate. Wait for the time in Retry-After before trying again.',
            limitHeaders(limits.authFailures.max, limits.authFailures.windowMs, 0, seen.ttl ?? limits.authFailures.windowMs, true),
          );
        }
      }
      const result = await opts.accounts.authenticate(request.headers.authorization);
      if (!result.ok) {
        request.log.info({ reason: result.reason }, 'authentication failed');
        if (failures && limits) {
          const counted = await consult(failures, request, true);
          if (counted && !counted.isAllowed && counted.isExceeded) {
            throw new RateLimitedError(
              'Too many requests from this address failed to authenticate. Wait for the time in Retry-After before trying again.',
              limitHeaders(limits.authFailures.max, limits.authFailures.windowMs, 0, counted.ttl, true),
            );
          }
        }
        throw new UnauthorizedError(DETAILS[result.reason]);
      }
      request.principal = result.principal;
      // Every later line of this request names the key by its public prefix.
      request.log = request.log.child({ tenantId: result.principal.tenantId, keyPrefix: result.principal.keyPrefix });
      reply.log = request.log;
    }
    if (perKey && limits) {
      const r = await consult(perKey, request, true);
      if (!r || r.isAllowed) return;
      const headers = limitHeaders(r.max, limits.perKey.windowMs, r.remaining, r.ttl, r.isExceeded);
      if (r.isExceeded) {
        throw new RateLimitedError(
          `This API key made more than ${r.max} requests in ${Math.ceil(limits.perKey.windowMs / 1000)} s. Wait for the time in Retry-After before trying again.`,
          headers,
        );
      }
      for (const [k, v] of Object.entries(headers)) reply.header(k, v);
    }
  });
}

/** The caller of a tenant-scoped route (the auth hook guarantees one). */
export function principalOf(request: FastifyRequest): Principal {
  if (!request.principal) throw new Error(`route ${request.routeOptions.url ?? '?'} has no principal: is it outside the authenticated scope?`);
  return request.principal;
}
