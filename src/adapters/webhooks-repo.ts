import type { Db } from './db/client.js';
import { translateDbError } from './db/errors.js';
import { translateErrors } from './translate.js';
import type { DeliveryStatus, WebhookRepo } from '../core/webhooks.js';

/**
 * The webhook delivery queue in Postgres (webhook_deliveries, webhook_attempts). Rows are
 * inserted by the generated_images_webhook trigger when a job ends; dispatchers lease due rows
 * with FOR UPDATE SKIP LOCKED, so several workers share them without sending one twice at once,
 * and a lease whose holder died lapses at locked_until.
 */
export function createWebhookRepo(db: Db): WebhookRepo {
  const repo: WebhookRepo = {
    async claimDue(limit, leaseMs) {
      const rows = await db.$queryRaw<
        Array<{ id: string; image_id: string; tenant_id: string; event_type: string; url: string; attempts: number; payload: unknown }>
      >`
        UPDATE webhook_deliveries d SET locked_until = now() + make_interval(secs => ${leaseMs / 1000})
          FROM generated_images g
         WHERE g.id = d.image_id AND d.id IN (
           SELECT id FROM webhook_deliveries
            WHERE status = 'pending' AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
            ORDER BY next_attempt_at
            LIMIT ${limit}
              FOR UPDATE SKIP LOCKED)
     RETURNING d.id, d.image_id, g.tenant_id::text, d.event_type, d.url, d.attempts, d.payload`;
      return rows.map((r) => ({
        id: r.id,
        imageId: r.image_id,
        tenantId: r.tenant_id,
        eventType: r.event_type,
        url: r.url,
        attempts: r.attempts,
        // Stored as the JSON text that was signed, so retries send the same bytes.
        payload: typeof r.payload === 'string' ? r.payload : null,
      }));
    },

    async savePayload(id, payload) {
      // A JSON string value: jsonb would reorder and respace an object, and the signature is over the bytes.
      await db.webhookDelivery.update({ where: { id }, data: { payload } });
    },

    async recordAttempt(id, a, next) {
      await db.$transaction([
        db.webhookAttempt.create({
          data: { deliveryId: id, attempt: a.attempt, startedAt: a.startedAt, durationMs: a.durationMs, statusCode: a.statusCode, error: a.error },
        }),
        db.webhookDelivery.update({
          where: { id },
          data: {
            attempts: a.attempt,
            status: next.status,
            lockedUntil: null,
            lastStatusCode: a.statusCode,
            lastError: a.error,
            ...(next.nextAttemptAt ? { nextAttemptAt: next.nextAttemptAt } : {}),
            ...(next.status === 'pending' ? {} : { finishedAt: new Date() }),
          },
        }),
      ]);
    },

    async forImage(imageId) {
      const rows = await db.webhookDelivery.findMany({
        where: { imageId },
        orderBy: { createdAt: 'asc' },
        include: { attemptLog: { orderBy: { attempt: 'asc' } } },
      });
      return rows.map((r) => ({
        id: r.id,
        eventType: r.eventType,
        url: r.url,
        status: r.status as DeliveryStatus,
        attempts: r.attemptLog.map((a) => ({
          attempt: a.attempt,
          startedAt: a.startedAt,
          durationMs: a.durationMs,
          statusCode: a.statusCode,
          error: a.error,
        })),
        nextAttemptAt: r.status === 'pending' ? r.nextAttemptAt : null,
        createdAt: r.createdAt,
        finishedAt: r.finishedAt,
      }));
    },
  };
  return translateErrors(repo, translateDbError);
}
