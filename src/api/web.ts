import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { brotliCompressSync, constants as zlib, gzipSync } from 'node:zlib';
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { sendProblem } from './problem.js';

/**
 * The web page (web/, built by Vite into dist/web by `npm run build`), served by the API at `/`
 * from memory: the files are read once at start, compressed once (Brotli and gzip), and answered
 * with an ETag. Nothing is built at run time.
 *
 *  - `/` (index.html): `no-cache`, so a deploy is seen at the next load (a 304 while unchanged);
 *  - `/assets/*`: Vite names them by their content's hash, so they are `immutable` for a year;
 *  - other files at the top (the icon): a day.
 *
 * The page's content-security policy replaces the API's `default-src 'none'` on these answers
 * only: scripts, styles, images and requests from this origin alone, nothing inline (no
 * 'unsafe-inline', no nonces: Vite emits no inline script or style), images also from blob:
 * (previews and images are fetched with the API key and shown as blob URLs), no framing, no
 * plugins, forms posting nowhere else.
 */

export const PAGE_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' blob:",
  "connect-src 'self'",
  "manifest-src 'self'",
  "form-action 'self'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
].join('; ');

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.webp': 'image/webp',
  '.ico': 'image/x-icon',
  '.json': 'application/json',
  '.txt': 'text/plain; charset=utf-8',
};

/** Types worth compressing: text. Images are compressed already. */
const COMPRESSIBLE = /^(text\/|image\/svg|application\/json)/;

interface Asset {
  type: string;
  etag: string;
  cacheControl: string;
  identity: Buffer;
  br?: Buffer;
  gzip?: Buffer;
}

/** The built page: URL path -> file. */
export type WebAssets = Map<string, Asset>;

function cacheControlFor(urlPath: string): string {
  if (urlPath === '/') return 'no-cache';
  if (urlPath.startsWith('/assets/')) return 'public, max-age=31536000, immutable';
  return 'public, max-age=86400';
}

/** One file as served at `urlPath` ('/' for index.html). */
export function webAsset(urlPath: string, fileName: string, body: Buffer): Asset {
  const type = TYPES[path.extname(fileName)] ?? 'application/octet-stream';
  const asset: Asset = {
    type,
    etag: `"${createHash('sha256').update(body).digest('base64url').slice(0, 27)}"`,
    cacheControl: cacheControlFor(urlPath),
    identity: body,
  };
  if (COMPRESSIBLE.test(type) && body.length > 512) {
    asset.br = brotliCompressSync(body, { params: { [zlib.BROTLI_PARAM_QUALITY]: 11 } });
    asset.gzip = gzipSync(body, { level: 9 });
  }
  return asset;
}

/** Reads a built page (index.html and what lies beside it) into memory. */
export function loadWebAssets(dir: string): WebAssets {
  if (!existsSync(path.join(dir, 'index.html'))) throw new Error(`${dir} holds no index.html: build the web page with \`npm run build\``);
  const assets: WebAssets = new Map();
  const walk = (sub: string) => {
    for (const entry of readdirSync(path.join(dir, sub), { withFileTypes: true })) {
      const rel = path.posix.join(sub, entry.name);
      if (entry.isDirectory()) walk(rel);
      else if (entry.isFile())
        assets.set(rel === 'index.html' ? '/' : `/${rel}`, webAsset(rel === 'index.html' ? '/' : `/${rel}`, rel, readFileSync(path.join(dir, rel))));
    }
  };
  walk('');
  return assets;
}

/**
 * Where `npm run build` put the page: dist/web, found by walking up from this module (src/api in
 * a checkout run with tsx, dist/src/api when compiled, /app/dist/src/api in the image).
 */
export function findWebDir(from = path.dirname(fileURLToPath(import.meta.url))): string | undefined {
  for (let dir = from; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'dist', 'web');
    if (existsSync(path.join(candidate, 'index.html'))) return candidate;
    if (path.dirname(dir) === dir) return undefined;
  }
}

/** The codings an Accept-Encoding header takes: named with a q above 0 (`br;q=0` refuses Brotli). */
function acceptedCodings(header: string | undefined): Set<string> {
  const taken = new Set<string>();
  for (const part of (header ?? '').split(',')) {
    const [name, ...params] = part
      .trim()
      .toLowerCase()
      .split(/\s*;\s*/);
    const q = params.find((p) => p.startsWith('q='));
    if (name && (q === undefined || Number(q.slice(2)) > 0)) taken.add(name);
  }
  return taken;
}

/** The encoding to send: Brotli, then gzip, when the client takes it and the file has it. */
function encodingFor(request: FastifyRequest, asset: Asset): 'br' | 'gzip' | undefined {
  const accepted = acceptedCodings(request.headers['accept-encoding']);
  if (asset.br && accepted.has('br')) return 'br';
  if (asset.gzip && accepted.has('gzip')) return 'gzip';
  return undefined;
}

/**
 * Whether the request's If-None-Match names `etag`: a list of tags or `*`, compared weakly as
 * RFC 9110 says for this header (a `W/` a cache or proxy added still matches).
 */
export function holds(request: FastifyRequest, etag: string): boolean {
  const header = request.headers['if-none-match'];
  if (!header) return false;
  return header.split(',').some((tag) => {
    const t = tag.trim();
    return t === '*' || t.replace(/^W\//, '') === etag;
  });
}

function send(request: FastifyRequest, reply: FastifyReply, asset: Asset) {
  const encoding = encodingFor(request, asset);
  // Each encoding is its own representation, so its own strong ETag.
  const etag = encoding ? `${asset.etag.slice(0, -1)}-${encoding}"` : asset.etag;
  reply.header('cache-control', asset.cacheControl).header('etag', etag);
  if (asset.br) reply.header('vary', 'accept-encoding');
  if (holds(request, etag)) return reply.status(304).send();
  if (encoding) reply.header('content-encoding', encoding);
  return reply.type(asset.type).send(encoding ? asset[encoding] : asset.identity);
}

export interface WebPageOptions {
  /** The built page; absent when none was found: `/` then answers 503 (the start log says how to build it). */
  assets: WebAssets | undefined;
}

export const webPageRoutes: FastifyPluginAsync<WebPageOptions> = async (app, { assets }) => {
  // Every answer of these routes is the page's, errors included: same-origin and nothing inline.
  app.addHook('onSend', async (_request, reply) => {
    reply.header('content-security-policy', PAGE_CSP);
  });
  const hidden = { schema: { hide: true } };

  if (!assets) {
    app.get('/', hidden, (_request, reply) =>
      // Public words only; how to build it is in the API's log at start (src/api/main.ts).
      sendProblem(reply, 503, 'Service Unavailable', 'This server has no web page installed. The API itself works: see /docs.'),
    );
    return;
  }
  // One route per file (index.html at /, Vite's hashed assets, what web/public holds): nothing
  // else is the page's, so every other path keeps the API's own 404.
  for (const [urlPath, asset] of assets) app.get(urlPath, hidden, (request, reply) => send(request, reply, asset));
};
