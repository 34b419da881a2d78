import { createHmac } from 'node:crypto';

/**
 * Webhooks: when a job with a `webhook_url` ends (succeeded, failed, canceled), its outcome is
 * POSTed there, signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature
 * over "id.timestamp.body" with HMAC-SHA256), with the secret of the job's tenant.
 *
 * Durable: the delivery row is written by the database in the transaction that ends the job
 * (the generated_images_webhook trigger), and sent by dispatchers that every worker runs. A
 * dispatcher leases due rows (FOR UPDATE SKIP LOCKED with a lease time), sends, and records the
 * attempt; a failed send is retried with exponential backoff until `maxAttempts`. Nothing lives
 * only in a process: after any restart the rows are still due, and a lease of a dispatcher that
 * died lapses. Delivery is at least once (a crash between a receiver's 2xx and our record of it
 * sends again): receivers deduplicate by webhook-id, which stays the same on every retry, as
 * does the body.
 */

/**
 * The signing secret of one tenant's webhooks, derived from the deployment's WEBHOOK_SECRET:
 * "whsec_" + base64(HMAC-SHA256(master, "t2i-webhook-signing:" + tenant id)). Each tenant's
 * receivers verify with their own secret, so no tenant can sign as t2i towards another's
 * receiver; nothing is stored (the derivation is the only copy, and the master never leaves the
 * configuration); rotating the master rotates every tenant's secret.
 */
export function tenantSigningSecret(master: string, tenantId: string): string {
  const key = Buffer.from(master.replace(/^whsec_/, ''), 'base64');
  return `whsec_${createHmac('sha256', key).update(`t2i-webhook-signing:${tenantId}`).digest('base64')}`;
}

export interface DueDelivery {
  id: string;
  imageId: string;
  /** The job's tenant: its webhooks are signed with its own secret. */
  tenantId: string;
  /** image.succeeded, image.failed or image.canceled. */
  eventType: string;
  url: string;
  /** Attempts made so far. */
  attempts: number;
  /** The body sent before, kept so every retry is byte for byte the same; null before the first. */
  payload: string | null;
}

export interface AttemptRecord {
  attempt: number;
  startedAt: Date;
  durationMs: number;
  statusCode: number | null;
  /** Public: why no 2xx came back. */
  error: string | null;
}

export type DeliveryStatus = 'pending' | 'succeeded' | 'failed';

export interface WebhookDeliveryView {
  id: string;
  eventType: string;
  url: string;
  status: DeliveryStatus;
  attempts: AttemptRecord[];
  nextAttemptAt: Date | null;
  createdAt: Date;
  finishedAt: Date | null;
}

export interface WebhookRepo {
  /** Leases up to `limit` due deliveries for `leaseMs`; others will not take them meanwhile. */
  claimDue(limit: number, leaseMs: number): Promise<DueDelivery[]>;
  savePayload(id: string, payload: string): Promise<void>;
  /** Records an attempt and what the delivery becomes; releases the lease. */
  recordAttempt(id: string, attempt: AttemptRecord, next: { status: DeliveryStatus; nextAttemptAt?: Date }): Promise<void>;
  /** A job's deliveries with their attempts, oldest first. */
  forImage(imageId: string): Promise<WebhookDeliveryView[]>;
}

export interface WebhookSender {
  /** Rejects with `{ permanent: boolean, message }` when no answer came (or the URL is refused). */
  post(url: string, body: string, headers: Record<string, string>): Promise<{ status: number }>;
}

export interface WebhookDispatcherDeps {
  repo: WebhookRepo;
  sender: WebhookSender;
  /** Standard Webhooks signature header value ("v1,<base64>") of id, time and body, with the tenant's secret. */
  sign(tenantId: string, msgId: string, timestamp: Date, body: string): string;
  /** The event's `data`: the job as the API shows it, with its image URL(s) when it succeeded. */
  buildData(imageId: string): Promise<Record<string, unknown>>;
  maxAttempts: number;
  /** Wait after the first failed attempt; doubled after each further one, capped at maxBackoffMs. */
  backoffMs: number;
  maxBackoffMs: number;
  /** Deliveries sent at once by one dispatcher. */
  concurrency: number;
  log: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void };
  now?: () => Date;
}

/** How long a dispatcher holds a delivery it is sending: longer than a send can take. */
const LEASE_MS = 120_000;

/** The wait before attempt n+1, after n failed attempts: backoff × 2^(n-1), capped, with up to 10% jitter so retries of many deliveries spread. */
export function retryDelayMs(failedAttempts: number, backoffMs: number, maxBackoffMs: number, random = Math.random): number {
  const base = Math.min(maxBackoffMs, backoffMs * 2 ** Math.max(0, failedAttempts - 1));
  return Math.round(base * (1 + 0.1 * random()));
}

export function createWebhookDispatcher(deps: WebhookDispatcherDeps) {
  const now = deps.now ?? (() => new Date());

  async function deliver(d: DueDelivery): Promise<DeliveryStatus> {
    let body = d.payload;
    if (body === null) {
      const data = await deps.buildData(d.imageId);
      body = JSON.stringify({ type: d.eventType, timestamp: now().toISOString(), data });
      await deps.repo.savePayload(d.id, body);
    }
    const attempt = d.attempts + 1;
    const startedAt = now();
    const started = performance.now();
    let statusCode: number | null = null;
    let error: string | null = null;
    let permanent: boolean;
    try {
      // The signature covers the time of this attempt: receivers refuse old timestamps.
      const headers = {
        'content-type': 'application/json',
        'webhook-id': d.id,
        'webhook-timestamp': String(Math.floor(startedAt.getTime() / 1000)),
        'webhook-signature': deps.sign(d.tenantId, d.id, startedAt, body),
      };
      statusCode = (await deps.sender.post(d.url, body, headers)).status;
      if (statusCode < 200 || statusCode > 299) error = `the receiver answered ${statusCode}`;
      // 410 Gone: the receiver says this endpoint is no more (Standard Webhooks' convention).
      permanent = statusCode === 410;
    } catch (err) {
      const e = err as { message?: string; permanent?: boolean };
      error = e.message ?? 'sending failed';
      permanent = e.permanent === true;
    }
    const durationMs = Math.round(performance.now() - started);
    const record: AttemptRecord = { attempt, startedAt, durationMs, statusCode, error };
    if (error === null) {
      await deps.repo.recordAttempt(d.id, record, { status: 'succeeded' });
      deps.log.info({ deliveryId: d.id, imageId: d.imageId, attempt, statusCode, durationMs }, 'webhook delivered');
      return 'succeeded';
    }
    if (permanent || attempt >= deps.maxAttempts) {
      await deps.repo.recordAttempt(d.id, record, { status: 'failed' });
      deps.log.warn({ deliveryId: d.id, imageId: d.imageId, attempt, statusCode, error }, 'webhook given up');
      return 'failed';
    }
    const nextAttemptAt = new Date(now().getTime() + retryDelayMs(attempt, deps.backoffMs, deps.maxBackoffMs));
    await deps.repo.recordAttempt(d.id, record, { status: 'pending', nextAttemptAt });
    deps.log.info({ deliveryId: d.id, imageId: d.imageId, attempt, statusCode, error, nextAttemptAt }, 'webhook attempt failed; will retry');
    return 'pending';
  }

  /** One pass: claims what is due and sends it, `concurrency` at a time. Returns how many were attempted. */
  async function runOnce(): Promise<number> {
    const due = await deps.repo.claimDue(deps.concurrency, LEASE_MS);
    await Promise.all(
      due.map((d) =>
        deliver(d).catch((err: unknown) => {
          // Recording failed (database away): the lease lapses and the delivery is tried again.
          deps.log.warn({ err, deliveryId: d.id }, 'webhook attempt could not be recorded');
        }),
      ),
    );
    return due.length;
  }

  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  let running: Promise<void> = Promise.resolve();
  return {
    runOnce,
    /** Polls every `pollMs`; a pass that found a full batch goes on at once. */
    start(pollMs: number) {
      const loop = async () => {
        while (!stopped) {
          let n = 0;
          try {
            n = await runOnce();
          } catch (err) {
            deps.log.warn({ err }, 'webhook dispatch pass failed');
          }
          if (n < deps.concurrency) break;
        }
        if (!stopped)
          timer = setTimeout(() => {
            running = loop();
          }, pollMs);
      };
      running = loop();
    },
    /** Stops polling and waits for the sends in flight to be recorded. */
    async stop() {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
