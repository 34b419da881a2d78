import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readPngText } from '../../src/engine/png.js';
import { writeOracleModel } from '../../src/engine/testmodels/make.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/t2i.js');
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-cli-'));
  // Each test uses its own model directories; this one is shared read-only by the generating tests.
  await writeOracleModel(path.join(dir, 'fixtures', 'oracle'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

const t2i = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  run(process.execPath, [BIN, ...args], { cwd: dir, env: { ...process.env, MODEL_DIR: '', ...env } });

describe('t2i CLI', () => {
  it('make-test-models writes loadable model directories', async () => {
    const { stdout } = await t2i(['make-test-models', 'models', '--kind', 'oracle']);
    expect(stdout.trim()).toBe(path.join(dir, 'models', 'oracle'));
    for (const f of [
      'model_index.json',
      'unet/model.onnx',
      'text_encoder/model.onnx',
      'vae_decoder/model.onnx',
      'tokenizer/vocab.json',
      'scheduler/scheduler_config.json',
    ]) {
      expect(existsSync(path.join(dir, 'models', 'oracle', f))).toBe(true);
    }
  });

  it('generate writes a PNG with progress and per-phase timings', async () => {
    const { stdout, stderr } = await t2i([
      'generate',
      'a red circle',
      '--model',
      'fixtures/oracle',
      '--steps',
      '5',
      '--seed',
      '3',
      '--width',
      '128',
      '--height',
      '128',
      '--scheduler',
      'euler',
      '-o',
      'out.png',
    ]);
    expect(stdout.trim()).toBe(path.join(dir, 'out.png'));
    expect(stderr).toMatch(/step 5\/5/);
    expect(stderr).toMatch(/load [\d.]+ s \| encode [\d.]+ s \| denoise [\d.]+ s \| decode [\d.]+ s \| total [\d.]+ s/);
    expect(stderr).toContain('seed 3');
    const png = await readFile(path.join(dir, 'out.png'));
    expect(readPngText(png)).toMatchObject({ prompt: 'a red circle', seed: '3', scheduler: 'euler' });
  });

  it('make-test-models --variant sdxl writes an SDXL oracle that generate reports and draws', async () => {
    const { stdout } = await t2i(['make-test-models', 'models', '--kind', 'oracle', '--variant', 'sdxl']);
    expect(stdout.trim()).toBe(path.join(dir, 'models', 'oracle-sdxl'));
    for (const f of ['text_encoder_2/model.onnx', 'tokenizer_2/vocab.json', 'unet/config.json', 'vae_decoder/config.json']) {
      expect(existsSync(path.join(dir, 'models', 'oracle-sdxl', f))).toBe(true);
    }
    const { stderr } = await t2i([
      'generate',
      'a red circle',
      '--model',
      'models/oracle-sdxl',
      '--steps',
      '3',
      '--width',
      '64',
      '--height',
      '64',
      '-o',
      'xl.png',
    ]);
    expect(stderr).toMatch(/info: model: SDXL \(/);
    expect(stderr).toMatch(/\(SDXL\) on cpu; scheduler euler, 3 steps, guidance 5, seed \d+, 64x64/);
  });

  it('generate --image --strength runs image-to-image, and --mask inpainting', async () => {
    await writeFile(
      path.join(dir, 'in.png'),
      await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 0, g: 0, b: 255 } } })
        .png()
        .toBuffer(),
    );
    const { stderr } = await t2i([
      'generate',
      'a red circle',
      '--model',
      'fixtures/oracle',
      '--image',
      'in.png',
      '--strength',
      '0',
      '--seed',
      '1',
      '-o',
      'i2i.png',
    ]);
    expect(stderr).toMatch(/64x64, strength 0\n/);
    // Strength 0 keeps the input: blue.
    const px = await sharp(await readFile(path.join(dir, 'i2i.png')))
      .raw()
      .toBuffer();
    expect(Array.from(px.subarray(0, 3))).toEqual([0, 0, 255]);
    const inpaint = await t2i(['generate', 'red', '--model', 'fixtures/oracle', '--image', 'in.png', '--mask', 'in.png', '--steps', '4', '-o', 'inpaint.png']);
    expect(inpaint.stderr).toMatch(/strength 0\.8\n/);
  });

  it('tokenize prints ids and the truncation', async () => {
    const { stdout } = await t2i(['tokenize', Array(40).fill('red circle').join(' '), '--model', 'fixtures/oracle']);
    expect(stdout).toMatch(
      /^\d+( \d+)+\n77 tokens \(with start and end\), padded to 77 with \d+\ntruncated: 5 tokens dropped: "circle red circle red circle"\n$/,
    );
  });

  it('generate without --model or MODEL_DIR says on stderr, every time, that it draws with the oracle test model', async () => {
    // A folder of its own: the first run must really be the first (it writes .t2i/models/oracle there).
    const cwd = await mkdtemp(path.join(dir, 'no-model-'));
    const generate = () =>
      run(process.execPath, [BIN, 'generate', 'a red circle', '--steps', '1', '--width', '64', '--height', '64', '-o', 'out.png'], {
        cwd,
        env: { ...process.env, MODEL_DIR: '' },
      });
    const oracleDir = path.join(cwd, '.t2i', 'models', 'oracle');
    const notice = `no --model or MODEL_DIR given: drawing with the oracle test model (${oracleDir})`;
    const first = await generate();
    expect(first.stderr).toContain(notice);
    expect(first.stderr).toContain(`writing the oracle test model to ${oracleDir}`);
    expect(existsSync(path.join(oracleDir, 'model_index.json'))).toBe(true);
    // The model is there now: nothing is written, and the notice is still given.
    const second = await generate();
    expect(second.stderr).toContain(notice);
    expect(second.stderr).not.toContain('writing the oracle test model');
    expect(second.stdout.trim()).toBe(path.join(cwd, 'out.png'));
  });

  it('explains bad arguments in one line and exits 1', async () => {
    await expect(t2i(['generate', 'x', '--model', 'fixtures/oracle', '--steps', 'many'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i generate: --steps must be an integer, got "many"\n',
    });
    await expect(t2i(['generate', 'x', '--model', 'fixtures/oracle', '--provider', 'tpu'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i generate: --provider must be one of auto, cuda, coreml, cpu, got "tpu"\n',
    });
    await expect(t2i(['generate', 'x', '--model', 'fixtures/oracle', '--image', 'missing.png'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i generate: --image: cannot read missing.png (ENOENT)\n',
    });
    await expect(t2i(['make-test-models', 'models', '--variant', 'sd3'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i make-test-models: --variant must be one of sd, sd2-v, inpaint, lcm, sdxl, sdxl-turbo or all, got "sd3"\n',
    });
    await expect(t2i(['frobnicate'])).rejects.toMatchObject({ code: 1 });
  });
});
