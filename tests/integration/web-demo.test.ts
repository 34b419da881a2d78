/**
 * The web page on the embedded-defaults demo (`t2i demo`, what scripts/demo.sh starts once it
 * has built the page): the demo as a real process with its own throwaway Postgres, Redis and S3
 * (OpenStack Swift), its API and its worker on the oracle model with the real engine. A person
 * reads the address and the key the demo prints, opens the page in Chromium, signs in, and
 * generates a picture the oracle model draws; the gallery holds it beside the demo's own job.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/dev/services.js';
import { axeViolations, buildWebPage, launchChromium, screenshotDir } from '../support/browser.js';

let demo: ChildProcess | undefined;
let exited: Promise<number | null> | undefined;
let output = '';
let webDir: string;
let browser: Browser | undefined;
let page: Page;
let pageUrl: string;
let port: number;
let key: string;
const shots = screenshotDir('web-demo');

/** Resolves once the demo's output matches `pattern`; fails with that output if it exits or takes too long. */
async function waitForOutput(pattern: RegExp, timeoutMs: number): Promise<RegExpExecArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = pattern.exec(output);
    if (m) return m;
    if (demo?.exitCode !== null || Date.now() > deadline) throw new Error(`the demo did not print ${pattern} (exit code ${demo?.exitCode}):\n${output}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

beforeAll(async () => {
  webDir = await mkdtemp(path.join(os.tmpdir(), 't2i-web-demo-'));
  await buildWebPage(webDir);
  port = await freePort();
  const metricsPort = await freePort();
  // Only what a person's shell would hand it, and the freshly built page.
  demo = spawn(process.execPath, [path.resolve('bin/t2i.js'), 'demo', '--port', String(port), '--metrics-port', String(metricsPort)], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME, WEB_DIR: webDir },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const proc = demo;
  exited = new Promise((resolve) => proc.once('exit', (code) => resolve(code)));
  proc.stdout!.on('data', (c: Buffer) => (output += c.toString()));
  proc.stderr!.on('data', (c: Buffer) => (output += c.toString()));
  await waitForOutput(/running until Ctrl-C/, 240_000);
  const m = await waitForOutput(/The web page: open (http:\/\/127\.0\.0\.1:\d+\/) in a browser[^\n]*\n\s+(t2i_[0-9a-f]{8}_[0-9a-f]{64})\n/, 1_000);
  pageUrl = m[1]!;
  key = m[2]!;
  browser = await launchChromium();
  page = await (await browser.newContext({ viewport: { width: 1100, height: 900 } })).newPage();
}, 300_000);

afterAll(async () => {
  await browser?.close();
  // The demo was started here: stop it by its own process, as Ctrl-C would, and let it remove its services.
  if (demo && demo.exitCode === null) {
    demo.kill('SIGINT');
    const timer = setTimeout(() => demo?.kill('SIGKILL'), 60_000);
    await exited;
    clearTimeout(timer);
  }
  if (webDir) await rm(webDir, { recursive: true, force: true });
}, 90_000);

describe('the web page on the demo', () => {
  it('is at the address the demo prints, on its own port, and takes the key it prints', async () => {
    expect(pageUrl).toBe(`http://127.0.0.1:${port}/`);
    await page.goto(pageUrl);
    await page.getByLabel('API key', { exact: true }).fill(key);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await expect.poll(() => page.locator('#tenant-name').textContent(), { timeout: 15_000 }).toBe('demo');
    // The form is the oracle model's, as the worker reports it.
    await expect.poll(() => page.locator('#f-model option').first().textContent()).toMatch(/^oracle\b/);
    // The demo's own job is in the gallery.
    await expect.poll(() => page.locator('#gallery-list .card-prompt').allTextContents()).toEqual(['a red circle on the left']);
  });

  it('generates what the oracle model draws, with progress and a preview, and lists it', async () => {
    await page.getByLabel('Prompt', { exact: true }).fill('a big blue circle');
    await page.getByLabel('Steps', { exact: true }).fill('20');
    await page.getByLabel('Seed (empty: random)', { exact: true }).fill('7');
    await page.getByLabel('Prompt', { exact: true }).press('Control+Enter');
    await expect.poll(() => page.locator('#live-phase').textContent(), { timeout: 120_000 }).toBe('Done');
    expect(await page.locator('#live-percent').textContent()).toBe('100%');
    expect(await page.locator('#live-previews img').count()).toBeGreaterThanOrEqual(1);
    const final = page.locator('#live-results img').first();
    await expect.poll(() => final.evaluate((i: HTMLImageElement) => i.complete && i.naturalWidth)).toBe(512);
    // The picture the page shows is the oracle's: blue in the middle, not in the corner (read
    // through a canvas: the page's policy lets nothing fetch its blob URLs).
    const [centre, corner] = await final.evaluate((i: HTMLImageElement) => {
      const canvas = document.createElement('canvas');
      canvas.width = i.naturalWidth;
      canvas.height = i.naturalHeight;
      const ctx = canvas.getContext('2d')!;
      ctx.drawImage(i, 0, 0);
      return [Array.from(ctx.getImageData(256, 256, 1, 1).data), Array.from(ctx.getImageData(8, 8, 1, 1).data)];
    });
    const [r, g, b] = centre;
    expect(b).toBeGreaterThan(200);
    expect(Math.max(r!, g!)).toBeLessThan(60);
    expect(corner[2]).toBeLessThan(200);
    await expect.poll(() => page.locator('#gallery-list .card-prompt').allTextContents()).toEqual(['a big blue circle', 'a red circle on the left']);
    await expect
      .poll(() =>
        page.locator('#gallery-list .thumb img').evaluateAll((imgs: HTMLImageElement[]) => imgs.filter((i) => i.complete && i.naturalWidth > 0).length),
      )
      .toBe(2);
    await page.screenshot({ path: path.join(shots, 'demo-done.png'), fullPage: true });
    const serious = (await axeViolations(page)).filter((v) => v.impact === 'serious' || v.impact === 'critical');
    expect(serious.map((v) => v.id)).toEqual([]);
  });

  it('stops cleanly on Ctrl-C', async () => {
    await browser?.close();
    browser = undefined;
    demo!.kill('SIGINT');
    expect(await exited).toBe(0);
    expect(output).toMatch(/stopped\s*$/);
  }, 90_000);
});
