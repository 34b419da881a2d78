import { describe, expect, it } from 'vitest';
import { generateApiKey, hashApiKey, parseApiKey, parsePrefix } from '../../src/core/api-keys.js';

/** The key format and what is stored of a key: pure functions, no I/O. */

describe('API keys', () => {
  it('are t2i_<8 hex prefix>_<64 hex secret>, each different, with the SHA-256 of the whole key as hash', () => {
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const k = generateApiKey();
      expect(k.key).toMatch(/^t2i_[0-9a-f]{8}_[0-9a-f]{64}$/);
      expect(k.key.startsWith(`t2i_${k.prefix}_`)).toBe(true);
      expect(k.hash).toBe(hashApiKey(k.key));
      expect(k.hash).toMatch(/^[0-9a-f]{64}$/);
      // The hash is not the secret, nor contains it.
      expect(k.hash).not.toBe(k.key.slice(13));
      seen.add(k.key);
    }
    expect(seen.size).toBe(200);
  });

  it('parses only well-formed keys', () => {
    const { key, prefix } = generateApiKey();
    expect(parseApiKey(key)).toEqual({ key, prefix });
    for (const bad of ['', 't2i_', key.toUpperCase(), `${key}0`, key.slice(0, -1), ` ${key}`, key.replace('t2i_', 'sk_'), `t2i_${prefix}`]) {
      expect(parseApiKey(bad), bad).toBeNull();
    }
  });

  it('takes a prefix for revocation as 8 hex digits or a key’s leading part', () => {
    const { key, prefix } = generateApiKey();
    expect(parsePrefix(prefix)).toBe(prefix);
    expect(parsePrefix(`t2i_${prefix}`)).toBe(prefix);
    expect(parsePrefix(key)).toBe(prefix);
    for (const bad of ['', '1234567', '123456789', 'zzzzzzzz', 't2i_']) expect(parsePrefix(bad), bad).toBeNull();
  });
});
