/**
 * The throwaway-services harness, checked the way the app will use it: real clients against
 * real PostgreSQL, Redis and Swift's S3 API, including the access-control cases (altered,
 * expired and missing signatures) that Node S3 emulators wave through.
 *
 * Needs the system packages: `sudo bash scripts/install-system-deps.sh`.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import * as Minio from 'minio';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDatabase, freePort, startServices, type LocalServices } from '../../src/dev/services.js';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host: '127.0.0.1', port });
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => resolve(false));
  });
}

async function eventually(cond: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return true;
    await sleep(100);
  }
  return cond();
}

// A small PNG-like body: the real signature, then bytes that are not valid UTF-8, so a
// transfer that re-encodes text would be caught by the byte comparison.
const PNG = Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), Buffer.from(Array.from({ length: 256 }, (_, i) => (i * 37) & 0xff))]);

/** A minio client for the services' S3 endpoint, path-style as Swift needs. */
function s3Client(svc: LocalServices, secretKey = svc.s3.secretKey): Minio.Client {
  return new Minio.Client({
    endPoint: '127.0.0.1',
    port: svc.s3.port,
    useSSL: false,
    accessKey: svc.s3.accessKey,
    secretKey,
    pathStyle: true,
    region: svc.s3.region,
  });
}

async function statusOf(url: string | URL): Promise<number> {
  const res = await fetch(url);
  await res.arrayBuffer(); // drain, so the connection is released
  return res.status;
}

describe('startServices (postgres + redis + swift s3)', () => {
  let svc: LocalServices;
  let s3: Minio.Client;
  /** Made in beforeAll with one object, for the tests that read it. */
  const bucket = 't2i-images';
  const key = 'jobs/abc/0.png';
  const startLog: string[] = [];

  beforeAll(async () => {
    svc = await startServices({ log: (m) => startLog.push(m) });
    s3 = s3Client(svc);
    await s3.makeBucket(bucket, svc.s3.region);
    await s3.putObject(bucket, key, PNG, PNG.length, { 'Content-Type': 'image/png' });
  });

  afterAll(async () => {
    await svc?.stop();
  });

  it('reports each service as ready on a loopback URL', () => {
    expect(svc.postgres.url).toMatch(/^postgresql:\/\/postgres@127\.0\.0\.1:\d+\/postgres$/);
    expect(svc.redis.url).toBe(`redis://127.0.0.1:${svc.redis.port}`);
    expect(svc.s3.endpoint).toBe(`http://127.0.0.1:${svc.s3.port}`);
    // proxy, account, container and object server, and their memcached.
    expect(svc.s3.pids).toHaveLength(5);
    expect(startLog.filter((l) => / ready: /.test(l))).toHaveLength(3);
    console.log(startLog.join('\n'));
  });

  it('postgres answers queries, and createDatabase gives an isolated database', async () => {
    const client = new pg.Client({ connectionString: svc.postgres.url });
    await client.connect();
    try {
      const { rows } = await client.query<{ one: number; fsync: string }>("SELECT 1 AS one, current_setting('fsync') AS fsync");
      expect(rows).toEqual([{ one: 1, fsync: 'off' }]);
    } finally {
      await client.end();
    }

    const url = await createDatabase(svc.postgres.url, 'test_isolated_1');
    expect(url).toBe(svc.postgres.url.replace(/\/postgres$/, '/test_isolated_1'));
    const other = new pg.Client({ connectionString: url });
    await other.connect();
    try {
      await other.query('CREATE TABLE t (x int)');
      const { rows } = await other.query<{ db: string }>('SELECT current_database() AS db');
      expect(rows[0]?.db).toBe('test_isolated_1');
    } finally {
      await other.end();
    }
    // The table is in the new database only.
    const main = new pg.Client({ connectionString: svc.postgres.url });
    await main.connect();
    try {
      const { rows } = await main.query<{ t: string | null }>("SELECT to_regclass('public.t')::text AS t");
      expect(rows[0]?.t).toBeNull();
    } finally {
      await main.end();
    }
    await expect(createDatabase(svc.postgres.url, 'bad; DROP')).rejects.toThrow(/not a plain identifier/);
  });

  it('redis answers PING and will never evict (BullMQ needs noeviction)', async () => {
    const redis = new Redis(svc.redis.url, { maxRetriesPerRequest: 1 });
    try {
      expect(await redis.ping()).toBe('PONG');
      expect(await redis.config('GET', 'maxmemory-policy')).toEqual(['maxmemory-policy', 'noeviction']);
      expect(await redis.config('GET', 'appendonly')).toEqual(['appendonly', 'no']);
      expect(await redis.config('GET', 'save')).toEqual(['save', '']);
    } finally {
      redis.disconnect();
    }
  });

  it('s3: makeBucket, putObject with a content type, statObject', async () => {
    const own = 't2i-make-bucket';
    await s3.makeBucket(own, svc.s3.region);
    expect(await s3.bucketExists(own)).toBe(true);
    await s3.putObject(own, key, PNG, PNG.length, { 'Content-Type': 'image/png' });
    const stat = await s3.statObject(own, key);
    expect(stat.size).toBe(PNG.length);
    expect(stat.metaData['content-type']).toBe('image/png');
  });

  it('s3: a presigned GET URL serves the same bytes to a plain fetch', async () => {
    const url = await s3.presignedGetObject(bucket, key, 60);
    const res = await fetch(url);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('image/png');
    expect(Buffer.from(await res.arrayBuffer()).equals(PNG)).toBe(true);
  });

  it('s3: an altered signature is refused with 403', async () => {
    const url = new URL(await s3.presignedGetObject(bucket, key, 60));
    const sig = url.searchParams.get('X-Amz-Signature') ?? '';
    expect(sig).toMatch(/^[0-9a-f]{64}$/);
    const flipped = (sig[0] === '0' ? '1' : '0') + sig.slice(1);
    url.searchParams.set('X-Amz-Signature', flipped);
    expect(await statusOf(url)).toBe(403);
  });

  it('s3: an expired presigned URL is refused with 403', async () => {
    // Signed two minutes ago: valid for 60 s it has expired, valid for 10 minutes it has not,
    // so the refusal is about expiry and nothing else, without waiting for the clock.
    const signedAt = new Date(Date.now() - 120_000);
    expect(await statusOf(await s3.presignedGetObject(bucket, key, 600, {}, signedAt))).toBe(200);
    expect(await statusOf(await s3.presignedGetObject(bucket, key, 60, {}, signedAt))).toBe(403);
  });

  it('s3: anonymous requests are refused like S3 does (403 AccessDenied)', async () => {
    for (const path of [`/${bucket}/${key}`, `/${bucket}`, '/']) {
      const res = await fetch(`${svc.s3.endpoint}${path}`);
      const body = await res.text();
      expect(res.status, `anonymous GET ${path}`).toBe(403);
      expect(body).toContain('<Code>AccessDenied</Code>');
    }
    // Swift's own API without a token is refused too.
    expect(await statusOf(`${svc.s3.endpoint}/v1/AUTH_test/${bucket}/${key}`)).toBe(401);
  });

  it('s3: a client with a wrong secret gets an error', async () => {
    const bad = s3Client(svc, `${svc.s3.secretKey}x`);
    await expect(bad.statObject(bucket, key)).rejects.toThrow();
    await expect(bad.listBuckets()).rejects.toThrow(/signature|denied|forbidden/i);
  });

  it('stopService/startService bring redis and postgres back on the same port (clients reconnect)', async () => {
    const redis = new Redis(svc.redis.url, { maxRetriesPerRequest: null, retryStrategy: () => 100 });
    redis.on('error', () => {}); // expected while redis is down
    try {
      await redis.set('k', 'v');
      const { port, pid } = svc.redis;
      await svc.stopService('redis');
      expect(pidAlive(pid)).toBe(false);
      expect(await portOpen(port)).toBe(false);
      await svc.startService('redis');
      expect(svc.redis.port).toBe(port);
      expect(svc.redis.pid).not.toBe(pid);
      expect(await redis.ping()).toBe('PONG'); // the same client, reconnected
      expect(await redis.get('k')).toBeNull(); // back empty, as after a crash
      expect(await redis.config('GET', 'maxmemory-policy')).toEqual(['maxmemory-policy', 'noeviction']);
    } finally {
      redis.disconnect();
    }

    // Postgres keeps its data across a restart.
    const url = await createDatabase(svc.postgres.url, 'test_restart');
    const before = new pg.Client({ connectionString: url });
    await before.connect();
    try {
      await before.query('CREATE TABLE t (x int)');
      await before.query('INSERT INTO t VALUES (42)');
    } finally {
      await before.end();
    }
    const { port, pid } = svc.postgres;
    await svc.restartService('postgres');
    expect(svc.postgres.pid).not.toBe(pid);
    expect(svc.postgres.port).toBe(port);
    const after = new pg.Client({ connectionString: url });
    await after.connect();
    try {
      const { rows } = await after.query<{ x: number }>('SELECT x FROM t');
      expect(rows).toEqual([{ x: 42 }]);
    } finally {
      await after.end();
    }
  });
});

describe('startServices options and failure handling', () => {
  it('only: starts just what is asked; the others throw a clear error', async () => {
    const svc = await startServices({ only: ['redis'] });
    try {
      expect(svc.redis.port).toBeGreaterThan(0);
      expect(() => svc.postgres).toThrow(/postgres was not started/);
      expect(() => svc.s3).toThrow(/s3 was not started/);
      expect(() => svc.stopService('postgres')).toThrow(/postgres was not started/);
    } finally {
      await svc.stop();
    }
  });

  it('stop() closes every port, ends every PID, removes the folder, and is idempotent', async () => {
    const svc = await startServices();
    const pids = [svc.postgres.pid, svc.redis.pid, ...svc.s3.pids];
    const ports = [svc.postgres.port, svc.redis.port, svc.s3.port];
    expect(pids.every(pidAlive)).toBe(true);
    expect(existsSync(svc.dir)).toBe(true);

    const t0 = performance.now();
    await svc.stop();
    console.log(`stop() took ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    await svc.stop(); // harmless

    for (const port of ports) expect(await portOpen(port), `port ${port} still open`).toBe(false);
    for (const pid of pids) expect(pidAlive(pid), `pid ${pid} still alive`).toBe(false);
    expect(existsSync(svc.dir)).toBe(false);
    expect(() => svc.stopService('redis')).toThrow(/stopped with stop\(\)/);
  });

  it('freePort returns a port nobody listens on', async () => {
    const port = await freePort();
    expect(port).toBeGreaterThan(1024);
    expect(await portOpen(port)).toBe(false);
  });

  it('a crashed (SIGKILLed) starter leaves no orphans: the watchdog kills the services and removes the folder', async () => {
    const servicesTs = fileURLToPath(new URL('../../src/dev/services.ts', import.meta.url));
    const code = `
      import { startServices } from ${JSON.stringify(servicesTs)};
      const s = await startServices({ only: ['redis'] });
      console.log(JSON.stringify({ pid: s.redis.pid, port: s.redis.port, dir: s.dir }));
      setInterval(() => {}, 1000);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
      });
      child.once('exit', (c) => reject(new Error(`child exited (${c}) before printing: ${out}`)));
    });
    const info = JSON.parse(line) as { pid: number; port: number; dir: string };
    expect(pidAlive(info.pid)).toBe(true);

    const t0 = performance.now();
    child.kill('SIGKILL');
    expect(await eventually(() => !pidAlive(info.pid), 10_000), 'redis still running after its starter died').toBe(true);
    expect(await eventually(() => !existsSync(info.dir), 10_000), 'temp folder left behind').toBe(true);
    console.log(`watchdog cleaned up ${((performance.now() - t0) / 1000).toFixed(2)} s after the starter was killed`);
    expect(await portOpen(info.port)).toBe(false);
  });
});
