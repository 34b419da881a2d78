/**
 * The S3 adapter against a real S3 API (OpenStack Swift, which checks SigV4 signatures, expiry
 * and anonymous access), so the presigned-URL cases below prove something.
 *
 * Needs the system packages: `sudo bash scripts/install-system-deps.sh`.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStorage, MAX_PRESIGN_TTL_SECONDS, objectKeyFor, StorageError, type ImageStorage, type StorageOptions } from '../../src/adapters/storage.js';
import { freePort, startServices, type LocalServices } from '../../src/dev/services.js';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Resolves once the wall clock is past `t` (ms since the epoch): Swift compares expiry with its clock, the same one. */
async function clockPasses(t: number): Promise<void> {
  while (Date.now() <= t) await sleep(t - Date.now() + 1);
}

/** When a SigV4 presigned URL stops being valid: X-Amz-Date plus X-Amz-Expires seconds. */
function urlExpiry(url: string): number {
  const q = new URL(url).searchParams;
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(q.get('X-Amz-Date') ?? '');
  if (!m) throw new Error(`no X-Amz-Date in ${url}`);
  const [, y, mo, d, h, mi, sec] = m.map(Number) as [number, number, number, number, number, number, number];
  return Date.UTC(y, mo - 1, d, h, mi, sec) + Number(q.get('X-Amz-Expires')) * 1000;
}

/** A PNG signature followed by bytes that are not valid UTF-8, so a transfer that re-encodes text is caught. */
function fakePng(len: number): Buffer {
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), randomBytes(len)]);
}

async function statusOf(url: string | URL): Promise<number> {
  const res = await fetch(url);
  await res.arrayBuffer(); // drain, so the connection is released
  return res.status;
}

describe('S3 storage adapter (against Swift)', () => {
  let svc: LocalServices;
  let base: StorageOptions;
  let storage: ImageStorage;

  beforeAll(async () => {
    svc = await startServices({ only: ['s3'] });
    base = {
      endpoint: svc.s3.endpoint,
      accessKey: svc.s3.accessKey,
      secretKey: svc.s3.secretKey,
      region: svc.s3.region,
      // A bucket per run: nothing left over from another test changes the outcome.
      bucket: `t2i-test-${randomUUID().slice(0, 8)}`,
      presignTtlSeconds: 600,
    };
    storage = createStorage(base);
    await storage.ensureBucket();
  });

  afterAll(async () => {
    await svc?.stop();
  });

  it('objectKeyFor gives each attempt its own object under images/<id>/ and refuses ids that could name another object', () => {
    expect(objectKeyFor('0f8e6c1a-1b2c-4d5e-8f90-123456789abc', 1)).toBe('images/0f8e6c1a-1b2c-4d5e-8f90-123456789abc/1.png');
    expect(objectKeyFor('0f8e6c1a-1b2c-4d5e-8f90-123456789abc', 2)).toBe('images/0f8e6c1a-1b2c-4d5e-8f90-123456789abc/2.png');
    expect(() => objectKeyFor('../x', 1)).toThrow(/letters, digits/);
    expect(() => objectKeyFor('', 1)).toThrow();
    expect(() => objectKeyFor('0f8e6c1a-1b2c-4d5e-8f90-123456789abc', 0)).toThrow(/attempt/);
  });

  it('ensureBucket creates a missing bucket; a second call and two concurrent calls succeed', async () => {
    const fresh = createStorage({ ...base, bucket: `${base.bucket}-fresh` });
    await expect(fresh.stat('images/nothing.png')).resolves.toBeNull();
    await expect(fresh.ping()).rejects.toThrow(/does not exist/);
    await fresh.ensureBucket();
    await fresh.ping();
    await fresh.ensureBucket();
    await Promise.all([fresh.ensureBucket(), fresh.ensureBucket()]);

    // Concurrent creation of a fresh bucket by separate processes (separate clients), the boot race.
    const racers = Array.from({ length: 3 }, () => createStorage({ ...base, bucket: `${base.bucket}-race` }));
    await Promise.all(racers.map((r) => r.ensureBucket()));
    await racers[0]!.ping();
  });

  it('putPng then stat shows the size and content type image/png', async () => {
    const key = objectKeyFor(randomUUID(), 1);
    const png = fakePng(1000);
    const put = await storage.putPng(key, png);
    expect(put.size).toBe(png.length);
    expect(put.etag).toMatch(/^[0-9a-f]{32}$/);
    const st = await storage.stat(key);
    expect(st).toEqual({ size: png.length, etag: put.etag, contentType: 'image/png' });
  });

  it('putPng stops when its signal aborts (a deadline), without storing the object', async () => {
    const key = objectKeyFor(randomUUID(), 1);
    const err = await storage.putPng(key, fakePng(2_000_000), { signal: AbortSignal.abort() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe('ABORTED');
    expect(await storage.stat(key)).toBeNull();
  });

  it('list gives the keys under a prefix: every attempt of one job, nothing of another', async () => {
    const id = randomUUID();
    await storage.putPng(objectKeyFor(id, 1), fakePng(10));
    await storage.putPng(objectKeyFor(id, 3), fakePng(11));
    await storage.putPng(objectKeyFor(randomUUID(), 1), fakePng(12));
    expect((await storage.list(`images/${id}/`)).sort()).toEqual([objectKeyFor(id, 1), objectKeyFor(id, 3)]);
    expect(await storage.list(`images/${randomUUID()}/`)).toEqual([]);
  });

  it('putPng twice to the same key overwrites the object', async () => {
    const key = objectKeyFor(randomUUID(), 1);
    await storage.putPng(key, fakePng(500));
    const second = fakePng(123);
    await storage.putPng(key, second);
    expect((await storage.stat(key))?.size).toBe(second.length);
    const res = await fetch((await storage.presignGet(key)).url);
    expect(Buffer.from(await res.arrayBuffer()).equals(second)).toBe(true);
  });

  it('stat of a missing key is null; remove deletes and tolerates a missing key', async () => {
    expect(await storage.stat('images/missing.png')).toBeNull();
    const key = objectKeyFor(randomUUID(), 1);
    await storage.putPng(key, fakePng(10));
    await storage.remove(key);
    expect(await storage.stat(key)).toBeNull();
    await storage.remove(key);
  });

  describe('presigned URLs', () => {
    const key = objectKeyFor(randomUUID(), 1);
    const otherKey = objectKeyFor(randomUUID(), 1);
    const png = fakePng(4096);

    beforeAll(async () => {
      await storage.putPng(key, png);
      await storage.putPng(otherKey, fakePng(64));
    });

    it('download the exact bytes with a plain fetch', async () => {
      const before = Date.now();
      const { url, expiresAt } = await storage.presignGet(key);
      expect(url.startsWith(`${svc.s3.endpoint}/${base.bucket}/${key}?`)).toBe(true);
      // Whole seconds, as in X-Amz-Date.
      expect(expiresAt.getTime() % 1000).toBe(0);
      expect(expiresAt.getTime()).toBeGreaterThan(before + 598_000);
      expect(expiresAt.getTime()).toBeLessThanOrEqual(Date.now() + 600_000);
      expect(new URL(url).searchParams.get('X-Amz-Expires')).toBe('600');
      const res = await fetch(url);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toBe('image/png');
      expect(Buffer.from(await res.arrayBuffer()).equals(png)).toBe(true);
    });

    it('an altered signature is refused with 403', async () => {
      const url = new URL((await storage.presignGet(key)).url);
      const sig = url.searchParams.get('X-Amz-Signature')!;
      expect(sig).toMatch(/^[0-9a-f]{64}$/);
      url.searchParams.set('X-Amz-Signature', (sig[0] === '0' ? '1' : '0') + sig.slice(1));
      expect(await statusOf(url)).toBe(403);
    });

    it('a URL whose key was changed to another existing object is refused with 403', async () => {
      const url = new URL((await storage.presignGet(key)).url);
      url.pathname = url.pathname.replace(key, otherKey);
      expect(url.pathname).toBe(`/${base.bucket}/${otherKey}`);
      expect(await statusOf(url)).toBe(403);
    });

    it('an expired URL is refused with 403', async () => {
      const { url, expiresAt } = await storage.presignGet(key, 1);
      expect(expiresAt.getTime()).toBe(urlExpiry(url));
      // Waits for the clock itself (at most about 1 s), not for a guessed duration.
      await clockPasses(expiresAt.getTime());
      expect(await statusOf(url)).toBe(403);
    });

    it('anonymous GET of the object is refused with 403 (the bucket is private)', async () => {
      expect(await statusOf(`${svc.s3.endpoint}/${base.bucket}/${key}`)).toBe(403);
    });

    it('are made for the public endpoint when one is configured, signed for that host', async () => {
      const pub = createStorage({ ...base, publicEndpoint: `http://localhost:${svc.s3.port}` });
      const { url } = await pub.presignGet(key);
      expect(url.startsWith(`http://localhost:${svc.s3.port}/${base.bucket}/${key}?`)).toBe(true);
      const res = await fetch(url);
      expect(res.status).toBe(200);
      expect(Buffer.from(await res.arrayBuffer()).equals(png)).toBe(true);
      // The same query string on the internal host fails: the signature covers the Host header.
      const u = new URL(url);
      u.hostname = '127.0.0.1';
      expect(await statusOf(u)).toBe(403);
    });

    it('a public endpoint nobody listens on still presigns (no network call)', async () => {
      const pub = createStorage({ ...base, publicEndpoint: 'https://images.example.invalid' });
      const { url } = await pub.presignGet(key, 60);
      expect(url.startsWith(`https://images.example.invalid/${base.bucket}/${key}?`)).toBe(true);
    });

    it('caps the lifetime at 7 days and rejects a ttl below 1 s', async () => {
      const { url, expiresAt } = await storage.presignGet(key, 30 * 24 * 3600);
      expect(expiresAt.getTime()).toBeLessThanOrEqual(Date.now() + MAX_PRESIGN_TTL_SECONDS * 1000);
      expect(new URL(url).searchParams.get('X-Amz-Expires')).toBe(String(MAX_PRESIGN_TTL_SECONDS));
      expect(await statusOf(url)).toBe(200);
      await expect(storage.presignGet(key, 0)).rejects.toThrow(/at least 1/);
    });
  });

  it('a wrong secret key makes ensureBucket reject with an error that names the fix but not the secret', async () => {
    const secretKey = `wrong-${randomBytes(8).toString('hex')}`;
    const bad = createStorage({ ...base, secretKey });
    const err = await bad.ensureBucket().then(
      () => expect.unreachable('ensureBucket should have failed'),
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(StorageError);
    const e = err as StorageError;
    expect(e.message).toMatch(/STORAGE_SECRET_KEY/);
    expect(e.message).toContain(base.bucket);
    expect(e.code).toMatch(/AccessDenied|SignatureDoesNotMatch/);
    const everything = JSON.stringify({ ...e, message: e.message, stack: e.stack });
    expect(everything).not.toContain(secretKey);
    expect(everything).not.toContain(svc.s3.secretKey);
    expect(e.cause).toBeUndefined();
    // putPng fails the same way, also without the secret.
    const putErr = (await bad.putPng('images/x.png', fakePng(1)).catch((x: unknown) => x)) as Error;
    expect(putErr.message).toMatch(/putPng .*images\/x\.png/);
    expect(putErr.message).not.toContain(secretKey);
  });

  it('ping against a closed port rejects within a few seconds, naming the endpoint', async () => {
    const port = await freePort();
    const down = createStorage({ ...base, endpoint: `127.0.0.1:${port}` });
    const t0 = Date.now();
    await expect(down.ping()).rejects.toThrow(new RegExp(`ping .*127\\.0\\.0\\.1:${port}.*ECONNREFUSED.*running`));
    expect(Date.now() - t0).toBeLessThan(3_000);
  });

  it('ping against a server that never answers gives up after its time limit', async () => {
    const { createServer } = await import('node:net');
    const sockets: import('node:net').Socket[] = [];
    const silent = createServer((s) => sockets.push(s)); // accepts, never replies
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    try {
      const port = (silent.address() as { port: number }).port;
      const hung = createStorage({ ...base, endpoint: `http://127.0.0.1:${port}` });
      const t0 = Date.now();
      await expect(hung.ping()).rejects.toThrow(/timed out/);
      const took = Date.now() - t0;
      expect(took).toBeGreaterThanOrEqual(1_900);
      expect(took).toBeLessThan(4_000);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => silent.close(() => r()));
    }
  });
});
