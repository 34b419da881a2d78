import type { FastifyRequest } from 'fastify';
import { ValidationError } from '../core/errors.js';

/**
 * The Idempotency-Key header of a submission (the IETF draft's header, as Stripe and OpenAI
 * take it): 1 to 255 visible ASCII characters, or absent. A UUID per logical request is what
 * clients usually send.
 */
export function idempotencyKeyOf(request: FastifyRequest): string | undefined {
  const raw = request.headers['idempotency-key'];
  if (raw === undefined) return undefined;
  const value = Array.isArray(raw) ? raw.join(',') : raw;
  if (!/^[\x21-\x7e]{1,255}$/.test(value)) {
    throw new ValidationError([{ field: 'Idempotency-Key', rule: 'format', message: 'must be 1 to 255 visible ASCII characters (a UUID, say)' }]);
  }
  return value;
}
