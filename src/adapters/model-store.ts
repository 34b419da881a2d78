import type { Readable } from 'node:stream';
import { makeClient } from './storage.js';
import type { ModelStore } from '../core/model-cache.js';

/**
 * Model exports in S3 (`s3://bucket/prefix/`), on the same endpoint and credentials as the
 * images (STORAGE_*): the object side of `t2i models push` and of the worker's model cache.
 * Errors name the object and never carry credentials.
 */

export interface ModelStoreOptions {
  endpoint: string;
  accessKey: string;
  secretKey: string;
  region: string;
}

/** s3://bucket/prefix/ -> bucket and prefix (always ending in / unless empty). */
export function parseModelUri(uri: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:\/(.*))?$/.exec(uri.trim());
  if (!m) throw new Error(`model URI "${uri}": expected s3://bucket/prefix/ (a valid bucket name, then the folder of the export)`);
  const prefix = (m[2] ?? '').replace(/^\/+/, '');
  if (prefix.split('/').some((p) => p === '..' || p === '.')) throw new Error(`model URI "${uri}": the prefix must not contain . or .. segments`);
  return { bucket: m[1]!, prefix: prefix === '' || prefix.endsWith('/') ? prefix : `${prefix}/` };
}

export function createModelStore(uri: string, opts: ModelStoreOptions): ModelStore {
  const { bucket, prefix } = parseModelUri(uri);
  const { client, url } = makeClient(opts.endpoint, opts);
  const secrets = [opts.secretKey, opts.accessKey].filter((s) => s.length >= 3);
  const where = (rel: string) => `s3://${bucket}/${prefix}${rel}`;
  const fail = (op: string, rel: string, err: unknown): Error => {
    const e = (err ?? {}) as { code?: unknown; message?: unknown };
    let text = `${typeof e.code === 'string' ? `${e.code}: ` : ''}${typeof e.message === 'string' ? e.message : String(err)}`;
    for (const s of secrets) text = text.split(s).join('[redacted]');
    return Object.assign(new Error(`model store: ${op} ${where(rel)} at ${url} failed: ${text}`), { code: e.code });
  };
  const missing = (err: unknown) => ['NoSuchKey', 'NotFound', 'NoSuchBucket'].includes(String((err as { code?: unknown } | null)?.code));

  return {
    uri: `s3://${bucket}/${prefix}`,
    describe: where,
    async readSmall(rel) {
      let stream: Readable;
      try {
        stream = await client.getObject(bucket, prefix + rel);
      } catch (err) {
        if (missing(err)) return null;
        throw fail('GET', rel, err);
      }
      const chunks: Buffer[] = [];
      try {
        for await (const c of stream) chunks.push(c as Buffer);
      } catch (err) {
        throw fail('GET', rel, err);
      }
      return Buffer.concat(chunks);
    },
    async read(rel, offset) {
      try {
        return offset > 0 ? await client.getPartialObject(bucket, prefix + rel, offset) : await client.getObject(bucket, prefix + rel);
      } catch (err) {
        throw fail(offset > 0 ? `GET (from byte ${offset})` : 'GET', rel, err);
      }
    },
    async writeFile(rel, file, sha256) {
      try {
        // fPutObject switches to a multipart upload for large files (UNet weights are GBs).
        await client.fPutObject(bucket, prefix + rel, file, { 'x-amz-meta-sha256': sha256 });
      } catch (err) {
        throw fail('PUT', rel, err);
      }
    },
    async writeSmall(rel, body) {
      try {
        await client.putObject(bucket, prefix + rel, body, body.length, { 'Content-Type': 'application/json' });
      } catch (err) {
        throw fail('PUT', rel, err);
      }
    },
    async ensureBucket() {
      try {
        if (!(await client.bucketExists(bucket))) await client.makeBucket(bucket, opts.region);
      } catch (err) {
        const code = (err as { code?: unknown } | null)?.code;
        if (code !== 'BucketAlreadyOwnedByYou' && code !== 'BucketAlreadyExists') throw fail('create bucket for', '', err);
      }
    },
  };
}
