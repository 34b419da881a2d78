import { Webhook } from 'standardwebhooks';

/**
 * Standard Webhooks signatures (the `standardwebhooks` package, the only module that imports
 * it): HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>" with the secret, sent as
 * "v1,<base64>". Receivers verify with the same package and secret (README "Webhooks").
 */

export function createSigner(secret: string): (msgId: string, timestamp: Date, body: string) => string {
  const wh = new Webhook(secret);
  return (msgId, timestamp, body) => wh.sign(msgId, timestamp, body);
}
