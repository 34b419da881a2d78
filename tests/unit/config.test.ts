import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ConfigError, envSchema, loadConfig, parseEndpoint } from '../../src/config.js';

/** The smallest valid environment: only the variables without a default. */
const MINIMAL = {
  DATABASE_URL: 'postgresql://t2i:pw@127.0.0.1:5432/t2i',
  STORAGE_ENDPOINT: 'http://127.0.0.1:9000',
  STORAGE_ACCESS_KEY: 'access',
  STORAGE_SECRET_KEY: 'secret-value',
} as const;

function configError(env: NodeJS.ProcessEnv, role?: 'api' | 'worker' | 'any'): ConfigError {
  try {
    loadConfig(env, role);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error('loadConfig accepted an invalid environment');
}

describe('loadConfig', () => {
  it('applies the defaults', () => {
    const c = loadConfig({ ...MINIMAL });
    expect(c).toMatchObject({
      ...MINIMAL,
      DATABASE_POOL_MAX: 10,
      REDIS_URL: 'redis://127.0.0.1:6379',
      QUEUE_NAME: 'generate-image',
      JOB_ATTEMPTS: 3,
      JOB_BACKOFF_MS: 5_000,
      JOB_LOCK_MS: 30_000,
      JOB_STALLED_INTERVAL_MS: 15_000,
      JOB_KEEP_COMPLETED: 1_000,
      JOB_KEEP_FAILED: 10_000,
      STORAGE_BUCKET: 't2i-images',
      STORAGE_REGION: 'us-east-1',
      PRESIGN_TTL_SECONDS: 3600,
      HOST: '127.0.0.1',
      PORT: 8000,
      BODY_LIMIT_BYTES: 65_536,
      EXECUTION_PROVIDER: 'auto',
      WORKER_METRICS_PORT: 9191,
      WORKER_METRICS_HOST: '127.0.0.1',
      PROGRESS_INTERVAL_MS: 500,
      LOG_LEVEL: 'info',
      AUTH: 'required',
      TRUST_PROXY: false,
      RATE_LIMIT_MAX: 600,
      RATE_LIMIT_WINDOW_MS: 60_000,
      AUTH_FAILURE_LIMIT: 30,
      AUTH_FAILURE_WINDOW_MS: 600_000,
      TENANT_MAX_IN_FLIGHT: 100,
      TENANT_DAILY_PIXEL_STEPS: 13_107_200_000,
      RETENTION_DAYS: 30,
    });
    expect(c.CORS_ORIGINS).toBeUndefined();
    for (const optional of ['STORAGE_PUBLIC_ENDPOINT', 'MODEL_DIR', 'ORT_THREADS', 'WORKER_ID', 'LOG_PRETTY'] as const) {
      expect(c[optional], optional).toBeUndefined();
    }
  });

  it('converts numbers and booleans, and ignores variables it does not know', () => {
    const c = loadConfig({ ...MINIMAL, PORT: '0', ORT_THREADS: '4', LOG_PRETTY: 'yes', PATH: '/usr/bin', HOME: '/root' });
    expect(c.PORT).toBe(0);
    expect(c.ORT_THREADS).toBe(4);
    expect(c.LOG_PRETTY).toBe(true);
    expect(loadConfig({ ...MINIMAL, LOG_PRETTY: '0' }).LOG_PRETTY).toBe(false);
    expect(c).not.toHaveProperty('PATH');
  });

  it('lists every invalid or missing variable at once', () => {
    const err = configError({
      DATABASE_URL: 'mysql://root:hunter2@db/t2i',
      PORT: 'abc',
      STORAGE_ENDPOINT: 'http://127.0.0.1:9000',
      STORAGE_SECRET_KEY: 'secret-value',
      JOB_ATTEMPTS: '0',
      LOG_LEVEL: 'loud',
      STORAGE_BUCKET: 'Not_A_Bucket',
    });
    const byVar = new Map(err.issues.map((i) => [i.slice(0, i.indexOf(':')), i]));
    expect([...byVar.keys()].sort()).toEqual(['DATABASE_URL', 'JOB_ATTEMPTS', 'LOG_LEVEL', 'PORT', 'STORAGE_ACCESS_KEY', 'STORAGE_BUCKET']);
    expect(byVar.get('DATABASE_URL')).toBe('DATABASE_URL: must be a postgresql:// URL');
    // A present but bad value is not "required" (that is only for absent ones).
    expect(byVar.get('PORT')).toBe('PORT: must be a whole number');
    expect(byVar.get('STORAGE_ACCESS_KEY')).toBe('STORAGE_ACCESS_KEY: required');
    expect(byVar.get('JOB_ATTEMPTS')).toMatch(/>=\s*1/);
    for (const issue of err.issues) expect(err.message).toContain(`  - ${issue}`);
    expect(err.message).toMatch(/^invalid configuration:\n/);
    // Values are never echoed: they may hold passwords.
    expect(err.message).not.toContain('hunter2');
    expect(err.message).not.toContain('secret-value');
  });

  it('treats empty (and whitespace-only) strings as unset', () => {
    const c = loadConfig({ ...MINIMAL, PORT: '', REDIS_URL: '', STORAGE_PUBLIC_ENDPOINT: '', ORT_THREADS: '  ', LOG_PRETTY: '' });
    expect(c.PORT).toBe(8000);
    expect(c.REDIS_URL).toBe('redis://127.0.0.1:6379');
    expect(c.STORAGE_PUBLIC_ENDPOINT).toBeUndefined();
    expect(c.ORT_THREADS).toBeUndefined();
    expect(c.LOG_PRETTY).toBeUndefined();
    // Before the fix, PORT="  " was coerced to port 0 (a random port).
    expect(loadConfig({ ...MINIMAL, PORT: ' ' }).PORT).toBe(8000);
    // An empty required variable is missing, not invalid.
    expect(configError({ ...MINIMAL, STORAGE_SECRET_KEY: '' }).issues).toEqual(['STORAGE_SECRET_KEY: required']);
  });

  it('requires MODEL_DIR for the worker role only, listed with the other problems', () => {
    expect(loadConfig({ ...MINIMAL }, 'api').MODEL_DIR).toBeUndefined();
    expect(configError({ ...MINIMAL }, 'worker').issues).toEqual(['MODEL_DIR: required by the worker (or MODEL_URI, a model export in S3)']);
    expect(configError({ ...MINIMAL, MODEL_DIR: '' }, 'worker').issues).toEqual(['MODEL_DIR: required by the worker (or MODEL_URI, a model export in S3)']);
    expect(loadConfig({ ...MINIMAL, MODEL_DIR: '/models/sd' }, 'worker').MODEL_DIR).toBe('/models/sd');
    // A model in S3 stands in for MODEL_DIR; the URI must name a bucket.
    expect(loadConfig({ ...MINIMAL, MODEL_URI: 's3://t2i-models/sd15/' }, 'worker').MODEL_URI).toBe('s3://t2i-models/sd15/');
    expect(configError({ ...MINIMAL, MODEL_URI: 'https://example.com/sd15' }, 'worker').issues).toEqual(['MODEL_URI: must be s3://bucket/prefix/']);
    const both = configError({ ...MINIMAL, PORT: 'abc' }, 'worker');
    expect(both.issues).toEqual(['PORT: must be a whole number', 'MODEL_DIR: required by the worker (or MODEL_URI, a model export in S3)']);
  });

  it('rejects PRESIGN_TTL_SECONDS above 7 days (S3 refuses longer presigned URLs)', () => {
    expect(loadConfig({ ...MINIMAL, PRESIGN_TTL_SECONDS: '604800' }).PRESIGN_TTL_SECONDS).toBe(604_800);
    expect(configError({ ...MINIMAL, PRESIGN_TTL_SECONDS: '604801' }).issues).toEqual([expect.stringMatching(/^PRESIGN_TTL_SECONDS: .*604800/)]);
    expect(configError({ ...MINIMAL, PRESIGN_TTL_SECONDS: '0' }).issues[0]).toMatch(/^PRESIGN_TTL_SECONDS:/);
    expect(configError({ ...MINIMAL, PRESIGN_TTL_SECONDS: '1.5' }).issues).toEqual(['PRESIGN_TTL_SECONDS: must be a whole number']);
  });

  it('rejects storage endpoints it cannot use, without echoing credentials', () => {
    const err = configError({ ...MINIMAL, STORAGE_ENDPOINT: 'http://user:pa55word@minio:9000', STORAGE_PUBLIC_ENDPOINT: 'ftp://files:21' });
    expect(err.issues.map((i) => i.split(':')[0])).toEqual(['STORAGE_ENDPOINT', 'STORAGE_PUBLIC_ENDPOINT']);
    expect(err.message).not.toContain('pa55word');
    expect(configError({ ...MINIMAL, STORAGE_ENDPOINT: 'http://minio:9000/bucket' }).issues[0]).toMatch(/^STORAGE_ENDPOINT: .*path/);
  });
});

describe('parseEndpoint', () => {
  it('reads a bare host:port as http', () => {
    expect(parseEndpoint('minio:9000')).toEqual({ host: 'minio', port: 9000, useSSL: false, url: 'http://minio:9000' });
    expect(parseEndpoint('127.0.0.1:9000')).toEqual({ host: '127.0.0.1', port: 9000, useSSL: false, url: 'http://127.0.0.1:9000' });
    expect(parseEndpoint('minio')).toEqual({ host: 'minio', port: 80, useSSL: false, url: 'http://minio' });
  });

  it('reads http URLs, with the default port 80 when none is given', () => {
    expect(parseEndpoint('http://localhost:9000')).toEqual({ host: 'localhost', port: 9000, useSSL: false, url: 'http://localhost:9000' });
    expect(parseEndpoint('http://minio:9000/')).toEqual({ host: 'minio', port: 9000, useSSL: false, url: 'http://minio:9000' });
    expect(parseEndpoint('http://minio')).toEqual({ host: 'minio', port: 80, useSSL: false, url: 'http://minio' });
    expect(parseEndpoint('HTTP://Minio:9000')).toEqual({ host: 'minio', port: 9000, useSSL: false, url: 'http://minio:9000' });
  });

  it('reads https URLs as TLS, with the default port 443', () => {
    expect(parseEndpoint('https://s3.example.com')).toEqual({ host: 's3.example.com', port: 443, useSSL: true, url: 'https://s3.example.com' });
    expect(parseEndpoint('https://s3.example.com:8443')).toEqual({ host: 's3.example.com', port: 8443, useSSL: true, url: 'https://s3.example.com:8443' });
  });

  it('refuses what the S3 client would silently misuse', () => {
    expect(() => parseEndpoint('ftp://files:21')).toThrow(/scheme "ftp:\/\/" is not supported/);
    expect(() => parseEndpoint('http://minio:9000/t2i-images')).toThrow(/must not have a path/);
    expect(() => parseEndpoint('http://minio:9000?x=1')).toThrow(/must not have a path or query/);
    expect(() => parseEndpoint('http://key:secret@minio:9000')).toThrow(/user:password/);
    expect(() => parseEndpoint('http://key:secret@minio:9000')).not.toThrow(/secret/);
    expect(() => parseEndpoint('minio:notaport')).toThrow(/not a valid/);
  });
});

describe('accounts and edges', () => {
  it('requires API keys unless AUTH=off, and refuses AUTH=off for the API on an address other machines reach', () => {
    expect(loadConfig({ ...MINIMAL }, 'api').AUTH).toBe('required');
    for (const host of ['127.0.0.1', '127.0.0.2', '::1', '[::1]', 'localhost']) {
      expect(loadConfig({ ...MINIMAL, AUTH: 'off', HOST: host }, 'api').AUTH, host).toBe('off');
    }
    for (const host of ['0.0.0.0', '::', '10.0.0.5', 'api.example.com']) {
      expect(configError({ ...MINIMAL, AUTH: 'off', HOST: host }, 'api').issues, host).toEqual([
        expect.stringMatching(/^AUTH: "off" is only allowed when HOST is a loopback address/),
      ]);
    }
    // A worker serves no API: its AUTH does not matter.
    expect(loadConfig({ ...MINIMAL, AUTH: 'off', HOST: '0.0.0.0' }, 'any').AUTH).toBe('off');
    expect(configError({ ...MINIMAL, AUTH: 'maybe' }).issues[0]).toMatch(/^AUTH:/);
  });

  it('reads CORS_ORIGINS as a list of origins, refusing paths and wildcards', () => {
    expect(loadConfig({ ...MINIMAL, CORS_ORIGINS: 'https://app.example.com, http://localhost:3000' }).CORS_ORIGINS).toEqual([
      'https://app.example.com',
      'http://localhost:3000',
    ]);
    for (const bad of ['*', 'https://app.example.com/', 'app.example.com', 'https://a.example.com/path', 'https://*.example.com']) {
      expect(configError({ ...MINIMAL, CORS_ORIGINS: bad }).issues[0], bad).toMatch(/^CORS_ORIGINS/);
    }
  });

  it('reads TRUST_PROXY as false, true, a hop count or addresses and CIDRs', () => {
    expect(loadConfig({ ...MINIMAL, TRUST_PROXY: 'true' }).TRUST_PROXY).toBe(true);
    expect(loadConfig({ ...MINIMAL, TRUST_PROXY: '2' }).TRUST_PROXY).toBe(2);
    expect(loadConfig({ ...MINIMAL, TRUST_PROXY: '10.0.0.0/8, 192.168.1.4,::1' }).TRUST_PROXY).toEqual(['10.0.0.0/8', '192.168.1.4', '::1']);
    for (const bad of ['yes', '10.0.0.0/33', 'proxy.example.com', '1.2.3.4/8/9']) {
      expect(configError({ ...MINIMAL, TRUST_PROXY: bad }).issues[0], bad).toMatch(/^TRUST_PROXY: /);
    }
  });

  it('bounds the limits, quotas and retention; 0 turns a limit off', () => {
    expect(loadConfig({ ...MINIMAL, RATE_LIMIT_MAX: '0', TENANT_MAX_IN_FLIGHT: '0', TENANT_DAILY_PIXEL_STEPS: '0', RETENTION_DAYS: '0' })).toMatchObject({
      RATE_LIMIT_MAX: 0,
      TENANT_MAX_IN_FLIGHT: 0,
      TENANT_DAILY_PIXEL_STEPS: 0,
      RETENTION_DAYS: 0,
    });
    expect(configError({ ...MINIMAL, AUTH_FAILURE_LIMIT: '0' }).issues[0]).toMatch(/^AUTH_FAILURE_LIMIT:/);
    expect(configError({ ...MINIMAL, RATE_LIMIT_WINDOW_MS: '10' }).issues[0]).toMatch(/^RATE_LIMIT_WINDOW_MS:/);
    expect(configError({ ...MINIMAL, RETENTION_DAYS: '-1' }).issues[0]).toMatch(/^RETENTION_DAYS:/);
  });
});

describe('.env.example', () => {
  const text = readFileSync(fileURLToPath(new URL('../../.env.example', import.meta.url)), 'utf8');
  const lines = text.split('\n');
  /** `NAME=value` (set) or `# NAME=value` (optional, showing the default or an example). */
  const entries = lines.flatMap((line, index) => {
    const m = /^(# ?)?([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
    return m ? [{ name: m[2]!, value: m[3]!, commented: m[1] !== undefined, index }] : [];
  });
  const schemaKeys = Object.keys(envSchema.shape);

  it('lists every variable of envSchema exactly once, in schema order, and nothing else', () => {
    const names = entries.map((e) => e.name);
    expect(new Set(names).size, 'a variable is listed twice').toBe(names.length);
    expect(
      names.filter((n) => !schemaKeys.includes(n)),
      'in .env.example but not in envSchema',
    ).toEqual([]);
    expect(
      schemaKeys.filter((k) => !names.includes(k)),
      'in envSchema but not in .env.example',
    ).toEqual([]);
    expect(names).toEqual(schemaKeys);
  });

  it('gives each variable the comment it has in src/config.ts', () => {
    const source = readFileSync(fileURLToPath(new URL('../../src/config.ts', import.meta.url)), 'utf8');
    const comments = new Map<string, string>();
    const schemaSource = source.slice(source.indexOf('export const envSchema'));
    // A JSDoc comment (one that does not run past its own */) right before `NAME:`.
    for (const m of schemaSource.matchAll(/\/\*\*((?:(?!\*\/)[\s\S])*)\*\/\s*([A-Z][A-Z0-9_]*):/g)) {
      comments.set(
        m[2]!,
        m[1]!
          .replace(/^\s*\*\s?/gm, '')
          .replace(/\s+/g, ' ')
          .trim(),
      );
    }
    expect([...comments.keys()].sort()).toEqual([...schemaKeys].sort()); // every variable is commented
    for (const e of entries) {
      // The comment block right above the variable's line.
      const block: string[] = [];
      for (let i = e.index - 1; i >= 0 && /^#/.test(lines[i]!) && !/^# ?[A-Z][A-Z0-9_]*=/.test(lines[i]!); i--) block.unshift(lines[i]!.replace(/^# ?/, ''));
      expect(block.join(' '), e.name).toContain(comments.get(e.name));
    }
  });

  it('is a valid worker configuration, and every commented-out value is valid and is the default when there is one', () => {
    const set = Object.fromEntries(entries.filter((e) => !e.commented).map((e) => [e.name, e.value]));
    expect(Object.keys(set).sort()).toEqual(
      [
        'DATABASE_URL',
        'HOST',
        'METRICS_TOKEN',
        'MODEL_DIR',
        'REDIS_URL',
        'STORAGE_ACCESS_KEY',
        'STORAGE_ENDPOINT',
        'STORAGE_PUBLIC_ENDPOINT',
        'STORAGE_SECRET_KEY',
        'WORKER_METRICS_HOST',
      ].sort(),
    );
    expect(set).toMatchObject({
      DATABASE_URL: 'postgresql://t2i:t2i@postgres:5432/t2i',
      REDIS_URL: 'redis://redis:6379',
      STORAGE_ENDPOINT: 'http://minio:9000',
      STORAGE_PUBLIC_ENDPOINT: 'http://localhost:9000',
      MODEL_DIR: '/models/stable-diffusion-v1-5-onnx',
    });
    loadConfig(set, 'worker');
    const all = Object.fromEntries(entries.map((e) => [e.name, e.value]));
    loadConfig(all, 'worker');

    const shape = envSchema.shape as Record<string, { safeParse(v: unknown): { success: boolean; data?: unknown } }>;
    for (const e of entries.filter((x) => x.commented)) {
      const fallback = shape[e.name]!.safeParse(undefined);
      if (fallback.success && fallback.data !== undefined) {
        expect(shape[e.name]!.safeParse(e.value).data, `${e.name} in .env.example is not its default`).toEqual(fallback.data);
      }
    }
  });
});
