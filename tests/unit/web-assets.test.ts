/**
 * How the API serves the built web page (src/api/web.ts), on files made here: which encoding a
 * client gets, the ETag of each encoding, 304s for the copy a client holds, caching per kind of
 * file, the page's content-security policy on every answer, and nothing else served.
 */
import Fastify, { type FastifyInstance } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { PAGE_CSP, webAsset, webPageRoutes, type WebAssets } from '../../src/api/web.js';

const HTML = Buffer.from(`<!doctype html><html><head><script type="module" src="/assets/main-abc.js"></script></head><body>${'x'.repeat(2000)}</body></html>`);
const JS = Buffer.from(`console.log(${JSON.stringify('y'.repeat(2000))});`);
const ICON = Buffer.from('<svg xmlns="http://www.w3.org/2000/svg"/>');

let app: FastifyInstance | undefined;

async function serve(assets: WebAssets | undefined): Promise<FastifyInstance> {
  app = Fastify();
  await app.register(webPageRoutes, { assets });
  return app;
}

function built(): WebAssets {
  return new Map([
    ['/', webAsset('/', 'index.html', HTML)],
    ['/assets/main-abc.js', webAsset('/assets/main-abc.js', 'assets/main-abc.js', JS)],
    ['/favicon.svg', webAsset('/favicon.svg', 'favicon.svg', ICON)],
  ]);
}

afterEach(async () => {
  await app?.close();
  app = undefined;
});

describe('the web page as the API serves it', () => {
  it('sends Brotli, then gzip, then the file itself, by what the client takes (q=0 refuses a coding)', async () => {
    const a = await serve(built());
    const get = (acceptEncoding?: string) => a.inject({ url: '/', headers: acceptEncoding === undefined ? {} : { 'accept-encoding': acceptEncoding } });
    expect((await get('gzip, deflate, br')).headers['content-encoding']).toBe('br');
    expect((await get('br;q=0, gzip')).headers['content-encoding']).toBe('gzip');
    expect((await get('BR;Q=0.5')).headers['content-encoding']).toBe('br');
    const plain = await get('identity');
    expect(plain.headers['content-encoding']).toBeUndefined();
    expect(plain.rawPayload.equals(HTML)).toBe(true);
    expect((await get()).rawPayload.equals(HTML)).toBe(true);
    expect((await get('gzip;q=0')).headers['content-encoding']).toBeUndefined();
    for (const r of [await get('br'), plain]) expect(r.headers.vary).toBe('accept-encoding');
  });

  it('gives each encoding its own ETag, and answers 304 only for the copy the client holds (weakly compared, in a list, or *)', async () => {
    const a = await serve(built());
    const br = await a.inject({ url: '/', headers: { 'accept-encoding': 'br' } });
    const gzip = await a.inject({ url: '/', headers: { 'accept-encoding': 'gzip' } });
    const plain = await a.inject({ url: '/' });
    const tags = [br, gzip, plain].map((r) => String(r.headers.etag));
    expect(new Set(tags).size).toBe(3);
    for (const t of tags) expect(t).toMatch(/^"[\w-]+"$/);
    const again = (acceptEncoding: string, ifNoneMatch: string) =>
      a.inject({ url: '/', headers: { 'accept-encoding': acceptEncoding, 'if-none-match': ifNoneMatch } }).then((r) => r.statusCode);
    expect(await again('br', tags[0]!)).toBe(304);
    expect(await again('br', `W/${tags[0]!}`)).toBe(304);
    expect(await again('br', `"other", ${tags[0]!}`)).toBe(304);
    expect(await again('br', '*')).toBe(304);
    // The Brotli copy is not what a gzip-only client may keep using, nor the other way round.
    expect(await again('gzip', tags[0]!)).toBe(200);
    expect(await again('br', tags[1]!)).toBe(200);
    expect(await again('identity', tags[0]!)).toBe(200);
    const notModified = await a.inject({ url: '/', headers: { 'accept-encoding': 'br', 'if-none-match': tags[0]! } });
    expect(notModified.rawPayload.length).toBe(0);
    expect(notModified.headers['content-security-policy']).toBe(PAGE_CSP);
  });

  it('caches the page for no time, hashed assets for a year, other files for a day; small files uncompressed', async () => {
    const a = await serve(built());
    const page = await a.inject({ url: '/' });
    expect(page.headers['cache-control']).toBe('no-cache');
    expect(page.headers['content-type']).toBe('text/html; charset=utf-8');
    const js = await a.inject({ url: '/assets/main-abc.js', headers: { 'accept-encoding': 'br' } });
    expect(js.headers['cache-control']).toBe('public, max-age=31536000, immutable');
    expect(js.headers['content-type']).toBe('text/javascript; charset=utf-8');
    expect(js.headers['content-encoding']).toBe('br');
    const icon = await a.inject({ url: '/favicon.svg', headers: { 'accept-encoding': 'br' } });
    expect(icon.headers['cache-control']).toBe('public, max-age=86400');
    expect(icon.headers['content-type']).toBe('image/svg+xml');
    expect(icon.headers['content-encoding']).toBeUndefined();
    expect(icon.headers.vary).toBeUndefined();
    for (const r of [page, js, icon]) expect(r.headers['content-security-policy']).toBe(PAGE_CSP);
  });

  it('serves only the files it was given', async () => {
    const a = await serve(built());
    for (const url of ['/index.html', '/assets/other.js', '/assets/../favicon.svg.map', '/src/main.ts']) expect((await a.inject({ url })).statusCode).toBe(404);
  });

  it('without a built page, / says so as a problem in public words, under the page’s policy', async () => {
    const a = await serve(undefined);
    const res = await a.inject({ url: '/' });
    expect(res.statusCode).toBe(503);
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(res.headers['content-security-policy']).toBe(PAGE_CSP);
    const body = res.json<{ detail: string }>();
    expect(body.detail).toBe('This server has no web page installed. The API itself works: see /docs.');
    expect(body.detail).not.toMatch(/WEB_DIR|dist\/|npm/);
  });
});
