/**
 * The S3 adapter: the only module that imports `minio`. The API presigns image URLs with it,
 * workers upload PNGs with it, and readiness probes ping through it.
 *
 * Two things the textbook got wrong and this fixes:
 * - it built a storage client per request; here there is one client per endpoint, made once;
 * - it signed URLs for the internal host name (http://minio:9000), which users outside the
 *   compose network cannot reach. A SigV4 signature covers the Host header, so a URL cannot be
 *   rewritten to another host afterwards: it must be signed for the public host from the start.
 *   Presigning is pure computation (the region is given, so minio never looks it up), so the
 *   public client never talks to the network and the public host need not be reachable from here.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash } from 'node:crypto';
import * as http from 'node:http';
import * as https from 'node:https';
import * as Minio from 'minio';
import { parseEndpoint } from '../config.js';

export interface StorageOptions {
  /** http(s)://host:port (or bare host:port) of the S3 API as this process reaches it. */
  endpoint: string;
  /** The endpoint presigned URLs are made for, when users reach storage at another address. */
  publicEndpoint?: string;
  accessKey: string;
  secretKey: string;
  bucket: string;
  region: string;
  /** Default lifetime of presigned URLs; S3 allows 7 days at most. */
  presignTtlSeconds: number;
}

export interface ImageStorage {
  readonly bucket: string;
  /** Creates the bucket if missing (private: no public policy) and checks we can use it. Safe to call from many processes at once. */
  ensureBucket(): Promise<void>;
  /**
   * Uploads with Content-Type image/png. The request carries the body's digest (minio signs its
   * SHA-256 over http and sends Content-MD5 over https), so the server refuses a body that
   * arrived damaged; the returned ETag is checked against the body's MD5 as well, so no second
   * request is needed to know the object is whole. `signal` aborts the upload (a deadline, a shutdown).
   */
  putPng(key: string, png: Buffer, opts?: { signal?: AbortSignal }): Promise<{ etag: string; size: number }>;
  /** An uploaded input picture (PNG, JPEG or WebP), checked as putPng checks its upload. */
  putInput(key: string, bytes: Buffer, contentType: string): Promise<{ etag: string; size: number }>;
  /** Keys under a prefix (at most 1,000: enough for one job's attempts). */
  list(prefix: string): Promise<string[]>;
  /** The object's bytes (images are small: a 2048 x 2048 PNG is at most 12 MB; uploads are bounded by MAX_UPLOAD_BYTES). */
  read(key: string): Promise<Buffer>;
  /** null when the object does not exist; other errors throw. */
  stat(key: string): Promise<{ size: number; etag: string; contentType: string | undefined } | null>;
  /** A presigned GET URL for the PUBLIC endpoint when one is configured (users outside the services' network), else the internal one. ttlSeconds defaults to presignTtlSeconds and is capped at 7 days. No network call. */
  presignGet(key: string, ttlSeconds?: number): Promise<{ url: string; expiresAt: Date }>;
  remove(key: string): Promise<void>;
  /** Removes every object of a job (each attempt stores its own, under images/<id>/). */
  removeImageObjects(imageId: string): Promise<void>;
  /** Cheap reachability check for readiness probes (bucketExists with a short timeout). */
  ping(): Promise<void>;
}

/** S3's hard limit on a presigned URL's lifetime (SigV4 rejects X-Amz-Expires above it). */
export const MAX_PRESIGN_TTL_SECONDS = 7 * 24 * 3600;
/** A readiness probe must answer fast: a storage server that takes longer counts as down. */
export const PING_TIMEOUT_MS = 2_000;
/**
 * Socket idle limit for every request. Without it a server that accepts the connection and
 * then stalls would hang a worker's upload forever (minio sets no timeout of its own).
 */
const IDLE_TIMEOUT_MS = 30_000;

/**
 * Where attempt `attempt` of a job stores its image. Each attempt has its own object, so a stale
 * attempt that wakes up late can never overwrite the image of the attempt that won; the job row
 * names the winner's key.
 */
export function objectKeyFor(imageId: string, attempt: number, index = 0): string {
  // The id becomes part of a path: refuse anything that could name another object.
  if (!/^[A-Za-z0-9_-]{1,200}$/.test(imageId)) {
    throw new Error(`objectKeyFor: image id "${imageId.slice(0, 80)}" must be 1-200 letters, digits, _ or -`);
  }
  if (!Number.isInteger(attempt) || attempt < 1) throw new Error(`objectKeyFor: attempt must be a positive integer, got ${attempt}`);
  if (!Number.isInteger(index) || index < 0) throw new Error(`objectKeyFor: index must be a whole number, got ${index}`);
  // Image 0 keeps the one-image name; the others of a job of several lie beside it.
  return index === 0 ? `images/${imageId}/${attempt}.png` : `images/${imageId}/${attempt}-${index}.png`;
}

/** A failed storage operation: what was attempted, on which object, and a hint at the fix. Never carries credentials. */
export class StorageError extends Error {
  override name = 'StorageError';
  constructor(
    message: string,
    readonly operation: string,
    readonly bucket: string,
    readonly key: string | undefined,
    /** The S3 error code (AccessDenied, NoSuchBucket, ...) or the network error code (ECONNREFUSED, ...). */
    readonly code: string | undefined,
  ) {
    super(message);
  }
}

// A per-call abort signal for the transport below. minio's API takes no signal, but every
// request it makes runs inside the caller's async context, so ping() can bound its request
// (DNS, connect and response) without a second client or a dangling request after a timeout.
const requestSignal = new AsyncLocalStorage<AbortSignal>();

function transportFor(useSSL: boolean): Pick<typeof http, 'request'> {
  const base = useSSL ? https : http;
  const request = (options: http.RequestOptions, callback?: (res: http.IncomingMessage) => void): http.ClientRequest => {
    const signal = requestSignal.getStore();
    // `timeout` in the options (unlike req.setTimeout) also covers the connect phase.
    const req = base.request({ ...options, timeout: IDLE_TIMEOUT_MS, ...(signal ? { signal } : {}) }, callback);
    req.on('timeout', () => {
      req.destroy(Object.assign(new Error(`no data from the server for ${IDLE_TIMEOUT_MS} ms`), { code: 'ETIMEDOUT' }));
    });
    return req;
  };
  return { request: request as typeof http.request };
}

/** An S3 client with this module's transport (idle timeouts, per-call abort): also used by the model store (model-store.ts). */
export function makeClient(endpoint: string, opts: Pick<StorageOptions, 'accessKey' | 'secretKey' | 'region'>): { client: Minio.Client; url: string } {
  const { host, port, useSSL, url } = parseEndpoint(endpoint);
  const client = new Minio.Client({
    endPoint: host,
    port,
    useSSL,
    accessKey: opts.accessKey,
    secretKey: opts.secretKey,
    // Given, so minio never asks the server for the bucket's region (presigning stays offline).
    region: opts.region,
    // Local servers (MinIO in compose, Swift in tests) have no per-bucket DNS names.
    pathStyle: true,
    transport: transportFor(useSSL),
  });
  return { client, url };
}

export function createStorage(opts: StorageOptions): ImageStorage {
  if (!Number.isInteger(opts.presignTtlSeconds) || opts.presignTtlSeconds < 1 || opts.presignTtlSeconds > MAX_PRESIGN_TTL_SECONDS) {
    throw new Error(`createStorage: presignTtlSeconds must be an integer from 1 to ${MAX_PRESIGN_TTL_SECONDS} (7 days), got ${opts.presignTtlSeconds}`);
  }
  const { bucket } = opts;
  const internal = makeClient(opts.endpoint, opts);
  const publicUrl = opts.publicEndpoint ? parseEndpoint(opts.publicEndpoint).url : undefined;
  // Only presigns, so it never opens a connection; reuse the internal client when both are the same.
  const presigner = opts.publicEndpoint && publicUrl !== internal.url ? makeClient(opts.publicEndpoint, opts).client : internal.client;
  const s3 = internal.client;

  const secrets = [opts.secretKey, opts.accessKey].filter((s) => s.length >= 3);
  /** Removes anything credential-like from text that came from the server or the network stack. */
  const redact = (text: string): string => {
    let out = text.replace(/(X-Amz-(Signature|Credential|Security-Token)=)[^&\s"'<]+/gi, '$1[redacted]');
    out = out.replace(/(Signature=|Credential=)[^,\s"'<]+/g, '$1[redacted]');
    for (const s of secrets) out = out.split(s).join('[redacted]');
    return out;
  };

  /** Wraps a minio or network error: what was attempted, on what, why it failed and what to check. No `cause`:
   * minio's S3Error carries fields from the server's XML (StringToSign, AWSAccessKeyId, ...) that loggers would print. */
  const fail = (operation: string, key: string | undefined, err: unknown): StorageError => {
    const e = (err ?? {}) as { code?: unknown; message?: unknown; name?: unknown };
    const code = typeof e.code === 'string' && e.code ? e.code : e.name === 'AbortError' ? 'ETIMEDOUT' : undefined;
    const reason =
      e.name === 'AbortError'
        ? 'timed out'
        : typeof e.message === 'string' && e.message
          ? e.message
          : code
            ? code
            : // minio gives no status for an error answer without a body (HEAD requests): a 400 there
              // is most often a signature scoped to the wrong region.
              'the server refused the request without details; check that STORAGE_REGION matches the server and STORAGE_ENDPOINT is an S3 API';
    const target = key === undefined ? `bucket "${bucket}"` : `"${bucket}/${key}"`;
    const msg = `storage: ${operation} ${target} at ${internal.url} failed: ${code && code !== reason ? `${code}: ` : ''}${redact(reason)}${hintFor(code, internal.url)}`;
    return new StorageError(msg, operation, bucket, key, code);
  };

  const isMissing = (err: unknown) => {
    const code = (err as { code?: unknown } | null)?.code;
    return code === 'NotFound' || code === 'NoSuchKey' || code === 'NoSuchBucket';
  };

  const bucketExists = async (operation: string): Promise<boolean> => {
    try {
      return await s3.bucketExists(bucket);
    } catch (err) {
      throw fail(operation, undefined, err);
    }
  };

  const putChecked = async (operation: string, key: string, body: Buffer, contentType: string, signal?: AbortSignal) => {
    let etag: string;
    try {
      const put = () => s3.putObject(bucket, key, body, body.length, { 'Content-Type': contentType });
      ({ etag } = signal ? await requestSignal.run(signal, put) : await put());
    } catch (err) {
      throw fail(operation, key, signal?.aborted ? Object.assign(new Error('aborted'), { code: 'ABORTED' }) : err);
    }
    // A single-part upload's ETag is the MD5 of the body; anything else means the object is not what was sent.
    const expected = createHash('md5').update(body).digest('hex');
    if (etag.replace(/"/g, '').toLowerCase() !== expected) {
      throw new StorageError(
        `storage: ${operation} "${bucket}/${key}": the server's ETag ${etag} is not the MD5 of the body (${expected})`,
        operation,
        bucket,
        key,
        'BadDigest',
      );
    }
    return { etag, size: body.length };
  };

  const storage: ImageStorage = {
    bucket,

    async ensureBucket() {
      if (await bucketExists('ensureBucket (check)')) return;
      try {
        // No bucket policy is set: a new bucket is private, and images are served by presigned URLs only.
        await s3.makeBucket(bucket, opts.region);
      } catch (err) {
        const code = (err as { code?: unknown } | null)?.code;
        // Another process created it between our check and our create (every API and worker
        // calls this at boot). AWS says BucketAlreadyOwnedByYou; Swift and some others say
        // BucketAlreadyExists even for our own bucket, so the check below tells the two apart.
        if (code !== 'BucketAlreadyOwnedByYou' && code !== 'BucketAlreadyExists') throw fail('ensureBucket (create)', undefined, err);
      }
      // HEAD proves the bucket is there and that these credentials may use it (403 if it is someone else's).
      if (!(await bucketExists('ensureBucket (verify)'))) {
        throw new StorageError(
          `storage: bucket "${bucket}" at ${internal.url} still does not exist after creating it; check that the endpoint is an S3 API and STORAGE_REGION matches the server`,
          'ensureBucket (verify)',
          bucket,
          undefined,
          'NoSuchBucket',
        );
      }
    },

    putPng(key, png, { signal } = {}) {
      return putChecked('putPng', key, png, 'image/png', signal);
    },

    putInput(key, bytes, contentType) {
      return putChecked('putInput', key, bytes, contentType);
    },

    async list(prefix) {
      try {
        const keys: string[] = [];
        for await (const item of s3.listObjectsV2(bucket, prefix, true) as AsyncIterable<{ name?: string }>) {
          if (item.name) keys.push(item.name);
          if (keys.length >= 1_000) break;
        }
        return keys;
      } catch (err) {
        throw fail('list', prefix, err);
      }
    },

    async read(key) {
      try {
        const stream = await s3.getObject(bucket, key);
        const chunks: Buffer[] = [];
        for await (const chunk of stream) chunks.push(chunk as Buffer);
        return Buffer.concat(chunks);
      } catch (err) {
        throw fail('read', key, err);
      }
    },

    async stat(key) {
      try {
        const st = await s3.statObject(bucket, key);
        const contentType: unknown = st.metaData['content-type'];
        return { size: st.size, etag: st.etag, contentType: typeof contentType === 'string' ? contentType : undefined };
      } catch (err) {
        if (isMissing(err)) return null;
        throw fail('stat', key, err);
      }
    },

    async presignGet(key, ttlSeconds = opts.presignTtlSeconds) {
      if (!Number.isFinite(ttlSeconds) || ttlSeconds < 1) {
        throw new Error(`storage: presignGet "${bucket}/${key}": ttlSeconds must be at least 1, got ${ttlSeconds}`);
      }
      const ttl = Math.min(Math.floor(ttlSeconds), MAX_PRESIGN_TTL_SECONDS);
      // X-Amz-Date has whole seconds: sign with a whole-second date so expiresAt is exact.
      const signedAt = new Date(Math.floor(Date.now() / 1000) * 1000);
      try {
        const url = await presigner.presignedGetObject(bucket, key, ttl, {}, signedAt);
        return { url, expiresAt: new Date(signedAt.getTime() + ttl * 1000) };
      } catch (err) {
        throw fail('presignGet', key, err);
      }
    },

    async remove(key) {
      try {
        await s3.removeObject(bucket, key);
      } catch (err) {
        if (isMissing(err)) return; // already gone is what the caller wanted
        throw fail('remove', key, err);
      }
    },

    async removeImageObjects(imageId) {
      const prefix = objectKeyFor(imageId, 1).replace(/[^/]+$/, '');
      for (const key of await storage.list(prefix)) await storage.remove(key);
    },

    async ping() {
      const signal = AbortSignal.timeout(PING_TIMEOUT_MS);
      let exists: boolean;
      try {
        exists = await requestSignal.run(signal, () => s3.bucketExists(bucket));
      } catch (err) {
        throw fail(`ping (${PING_TIMEOUT_MS} ms limit)`, undefined, signal.aborted ? Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' }) : err);
      }
      if (!exists) {
        throw new StorageError(
          `storage: ping: bucket "${bucket}" at ${internal.url} does not exist; ensureBucket() creates it at startup`,
          'ping',
          bucket,
          undefined,
          'NoSuchBucket',
        );
      }
    },
  };
  return storage;
}

function hintFor(code: string | undefined, url: string): string {
  switch (code) {
    case 'AccessDenied':
    case 'SignatureDoesNotMatch':
    case 'InvalidAccessKeyId':
      return '; check STORAGE_ACCESS_KEY and STORAGE_SECRET_KEY, and that these credentials may use STORAGE_BUCKET';
    case 'AuthorizationHeaderMalformed':
    case 'AuthorizationQueryParametersError':
      return '; check that STORAGE_REGION matches the server';
    case 'NoSuchBucket':
      return '; the bucket is missing: ensureBucket() creates it at startup, or check STORAGE_BUCKET';
    case 'ECONNREFUSED':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'ETIMEDOUT':
    case 'ECONNRESET':
    case 'EHOSTUNREACH':
      return `; is the S3 server at ${url} running and STORAGE_ENDPOINT right?`;
    default:
      return '';
  }
}
