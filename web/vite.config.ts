import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

/**
 * The web page's build: web/ -> dist/web, which the API serves at / (src/api/web.ts).
 * `npm run build:web` (part of `npm run build` and of the API's Docker image).
 *
 * Nothing inline, so the content-security policy can forbid inline script and style: no asset
 * is inlined as a data: URL, and no module-preload polyfill is injected. `npm run dev:web`
 * serves the page with Vite and forwards the API's routes to the demo's API on :8000.
 */
const API = process.env.T2I_API ?? 'http://127.0.0.1:8000';

export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  publicDir: 'public',
  build: {
    outDir: fileURLToPath(new URL('../dist/web', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    reportCompressedSize: false,
  },
  server: {
    proxy: Object.fromEntries(['/generated-images', '/usage', '/models', '/schedulers'].map((p) => [p, API])),
  },
});
