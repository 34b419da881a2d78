import { Webhook } from 'standardwebhooks';

/**
 * Standard Webhooks signatures (the `standardwebhooks` package, the only module that imports
 * it): HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>" with the secret, sent as
 * "v1,<base64>". Receivers verify with the same package and secret (README "Webhooks").
 */

/** The form of a secret: "whsec_" and base64 of at least 24 random bytes. */
export const WEBHOOK_SECRET_FORMAT = /^whsec_[A-Za-z0-9+/]{32,}={0,2}$/;

export function createSigner(secret: string): (msgId: string, timestamp: Date, body: string) => string {
  const wh = new Webhook(secret);
  return (msgId, timestamp, body) => wh.sign(msgId, timestamp, body);
}
