import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { promisify } from 'node:util';
import { chromium, type Browser, type Page } from 'playwright-core';

/**
 * A real browser for the web page's tests: Debian's Chromium (scripts/install-system-deps.sh
 * installs it; Playwright's own browser downloads cannot work offline) driven by playwright-core,
 * axe-core injected for accessibility checks, screenshots kept for people to look at.
 */

export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

/** Launches Chromium headless; fails saying how to install it when it is missing. */
export async function launchChromium(): Promise<Browser> {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `No Chromium at ${CHROMIUM}: the web page's tests drive a real browser. Install it with \`bash scripts/install-system-deps.sh\` (apt: chromium).`,
    );
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    // What works as root in a container without a GPU or a network (shared/reference/local-services.md).
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
}

const run = promisify(execFile);

/**
 * Builds the page with Vite into `outDir`, as `npm run build:web` does into dist/web, so the
 * test serves the sources as they are now rather than whatever an earlier build left.
 */
export async function buildWebPage(outDir: string): Promise<void> {
  // The package's own command, beside its package.json (its exports do not list bin/).
  const vite = path.join(path.dirname(createRequire(import.meta.url).resolve('vite/package.json')), 'bin', 'vite.js');
  await run(process.execPath, [vite, 'build', '--config', 'web/vite.config.ts', '--outDir', outDir, '--emptyOutDir', '--logLevel', 'warn'], {
    cwd: path.resolve('.'),
  });
}

/** Where screenshots and the accessibility report go: SCREENSHOT_DIR, else .t2i/screenshots/<name>. */
export function screenshotDir(name: string): string {
  const dir = process.env.SCREENSHOT_DIR ?? path.resolve('.t2i', 'screenshots', name);
  mkdirSync(dir, { recursive: true });
  return dir;
}

export interface AxeViolation {
  id: string;
  impact: 'minor' | 'moderate' | 'serious' | 'critical' | null;
  help: string;
  nodes: Array<{ target: unknown[]; failureSummary?: string }>;
}

const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

/**
 * Runs axe-core on the page as it is (WCAG 2.0-2.2 A and AA rules and best practices). axe is
 * evaluated through the DevTools protocol, which the page's CSP does not govern: the page itself
 * stays as strict as it is served.
 */
export async function axeViolations(page: Page): Promise<AxeViolation[]> {
  await page.evaluate(axeSource);
  return page.evaluate(async () => {
    const axe = (globalThis as unknown as { axe: { run(ctx: Document, opts: object): Promise<{ violations: AxeViolation[] }> } }).axe;
    const r = await axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.map((n) => ({ target: n.target, failureSummary: n.failureSummary })),
    }));
  });
}
