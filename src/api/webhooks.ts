import type { FastifyPluginAsync, FastifyRequest } from 'fastify';
import type { ImagesService } from '../core/images.js';
import type { WebhookRepo } from '../core/webhooks.js';
import { jobIdParams, problems, webhookDeliveriesSchema } from './schemas.js';

/**
 * GET /generated-images/{id}/webhook-deliveries: what became of a job's webhook, attempt by
 * attempt (when, how long, the receiver's status code or why there was none), and when the next
 * attempt is due. A job the caller cannot see answers 404 like any other route.
 */

export interface WebhookRoutesOptions {
  images: Pick<ImagesService, 'get'>;
  /** The caller's tenant (the auth hook has run). */
  tenantOf(request: FastifyRequest): string;
  deliveries: Pick<WebhookRepo, 'forImage'>;
}

export const webhookRoutes: FastifyPluginAsync<WebhookRoutesOptions> = async (app, opts) => {
  const schema = {
    tags: ['webhooks'],
    summary: "A job's webhook deliveries and their attempts",
    params: jobIdParams,
    response: { 200: webhookDeliveriesSchema, ...problems(401, 404, 429, 503) },
  };
  app.get<{ Params: { id: string } }>('/generated-images/:id/webhook-deliveries', { schema }, async (request) => {
    const job = await opts.images.get(opts.tenantOf(request), request.params.id);
    const items = await opts.deliveries.forImage(job.id);
    return {
      items: items.map((d) => ({
        id: d.id,
        event_type: d.eventType,
        url: d.url,
        status: d.status,
        attempts: d.attempts.map((a) => ({
          attempt: a.attempt,
          started_at: a.startedAt.toISOString(),
          duration_ms: a.durationMs,
          status_code: a.statusCode,
          error: a.error,
        })),
        next_attempt_at: d.nextAttemptAt?.toISOString() ?? null,
        created_at: d.createdAt.toISOString(),
        finished_at: d.finishedAt?.toISOString() ?? null,
      })),
    };
  });
};
