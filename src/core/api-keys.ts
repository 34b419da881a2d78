import { createHash, randomBytes } from 'node:crypto';

/**
 * The API key format, and what is stored of a key: `t2i_<prefix>_<secret>`, where the prefix
 * (8 hex digits, random) is public and names the key in listings and logs, and the secret is
 * 32 random bytes (64 hex digits). Hex only, so a key survives copy-paste, URLs and shells.
 *
 * Only the SHA-256 of the whole key is stored. A plain hash is right here, unlike for passwords:
 * the secret has 256 bits of entropy, so there is nothing to guess from a leaked hash, and a slow
 * hash (bcrypt, scrypt) would only make every request slower. The key is looked up BY its hash,
 * never by its prefix: an unknown key costs one index probe whether or not its prefix belongs to
 * a key, so no answer or timing tells an attacker which prefixes exist.
 */

export const KEY_PREFIX_HEX = 8;
const SECRET_BYTES = 32;
const KEY_FORMAT = /^t2i_([0-9a-f]{8})_([0-9a-f]{64})$/;

export interface NewApiKey {
  /** The whole key: shown once to whoever created it, never stored or logged. */
  key: string;
  prefix: string;
  hash: string;
}

export function generateApiKey(): NewApiKey {
  const prefix = randomBytes(KEY_PREFIX_HEX / 2).toString('hex');
  const key = `t2i_${prefix}_${randomBytes(SECRET_BYTES).toString('hex')}`;
  return { key, prefix, hash: hashApiKey(key) };
}

export function hashApiKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

/** The key and its prefix when `text` has the key format; null otherwise (no lookup is worth making). */
export function parseApiKey(text: string): { key: string; prefix: string } | null {
  const m = KEY_FORMAT.exec(text);
  return m ? { key: text, prefix: m[1]! } : null;
}

/** A prefix as `t2i keys revoke` takes it: the 8 hex digits, or a key's leading `t2i_<prefix>`. */
export function parsePrefix(text: string): string | null {
  const m = /^(?:t2i_)?([0-9a-f]{8})(?:_.*)?$/.exec(text.trim());
  return m ? m[1]! : null;
}

/** The secret part of any API key in a text; the public prefix stays, so the text still says whose. */
const KEY_SECRET_IN_TEXT = /\b(t2i_[0-9a-f]{8}_)[0-9a-f]{64}\b/g;

/**
 * Blanks the secret of every API key in a text: for log lines and error bodies that quote what a
 * client sent (a key pasted into a path, a query string or a body field).
 */
export function redactApiKeys(text: string, replacement = '[redacted]'): string {
  return text.replace(KEY_SECRET_IN_TEXT, `$1${replacement}`);
}
