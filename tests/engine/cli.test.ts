import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readPngText } from '../../src/engine/png.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/t2i.js');
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 't2i-cli-'));
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
      'models/oracle',
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

  it('tokenize prints ids and the truncation', async () => {
    const { stdout } = await t2i(['tokenize', Array(40).fill('red circle').join(' '), '--model', 'models/oracle']);
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
    await expect(t2i(['generate', 'x', '--model', 'models/oracle', '--steps', 'many'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i generate: --steps must be an integer, got "many"\n',
    });
    await expect(t2i(['generate', 'x', '--model', 'models/oracle', '--provider', 'tpu'])).rejects.toMatchObject({
      code: 1,
      stderr: 't2i generate: --provider must be one of auto, cuda, coreml, cpu, got "tpu"\n',
    });
    await expect(t2i(['frobnicate'])).rejects.toMatchObject({ code: 1 });
  });
});
