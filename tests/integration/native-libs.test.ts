/**
 * The build-time provider check of Dockerfile.worker (`t2i check-libs`), run as a real process
 * against real shared objects: onnxruntime-node's CPU binding (what the CPU image ships), a
 * folder where a library is deliberately missing, and a stand-in CUDA provider whose DT_NEEDED
 * names a CUDA 13 library. Each verdict is checked against the system's own tools: `readelf -d`
 * for what a file links and `ldd` (the loader itself) for what resolves.
 */
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { checkLibraries, readElf, sharedObjectsIn } from '../../src/adapters/elf.js';
import { bindingDir } from '../../src/engine/onnx/runtime.js';

const run = promisify(execFile);
const BIN = path.resolve('bin/t2i.js');
const BINDING = bindingDir()!;
const work = mkdtempSync(path.join(os.tmpdir(), 't2i-libs-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Runs `t2i check-libs`, returning the exit code and output instead of throwing on failure. */
async function checkLibs(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, 'check-libs', ...args], { env: { ...process.env, LD_LIBRARY_PATH: '', ...env } });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** DT_NEEDED entries as binutils' readelf prints them (installed by scripts/install-system-deps.sh). */
function readelfNeeded(file: string): string[] {
  let out: string;
  try {
    out = execFileSync('readelf', ['-d', file], { encoding: 'utf8' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new Error('readelf is not installed: run scripts/install-system-deps.sh (binutils)', { cause: err });
    throw err;
  }
  return [...out.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]!);
}

/** What the real loader resolves: `ldd FILE` lines as name -> path (or 'not found'). */
function ldd(file: string, env: NodeJS.ProcessEnv = {}): Map<string, string> {
  const out = execFileSync('ldd', [file], { encoding: 'utf8', env: { ...process.env, LD_LIBRARY_PATH: '', ...env } });
  const map = new Map<string, string>();
  for (const m of out.matchAll(/^\s*(\S+) => (not found|\S+)/gm)) map.set(m[1]!, m[2]!);
  return map;
}

/**
 * A copy of `src` whose first DT_NEEDED string `from` is overwritten with `to` (NUL-padded, so no
 * offset moves): a real ELF that links `to`, made without a toolchain.
 */
function withNeededRenamed(src: string, dest: string, from: string, to: string): void {
  expect(to.length, 'the new name must fit where the old one was').toBeLessThanOrEqual(from.length);
  const bytes = readFileSync(src);
  const needle = Buffer.from(`\0${from}\0`);
  const at = bytes.indexOf(needle);
  expect(at, `${src} has the string ${from}`).toBeGreaterThan(0);
  Buffer.from(to.padEnd(from.length, '\0')).copy(bytes, at + 1);
  writeFileSync(dest, bytes);
}

describe('t2i check-libs (the image build step)', () => {
  it("passes on the CPU binding's files, and lists what readelf and ldd see", async () => {
    const files = sharedObjectsIn(BINDING);
    expect(files.map((f) => path.basename(f))).toEqual(['libonnxruntime.so.1', 'onnxruntime_binding.node']);
    const r = await checkLibs([BINDING]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/\n10 shared objects checked, 0 libraries not found\n$/);
    for (const f of files) {
      expect(readElf(f).needed, `${f}: NEEDED as readelf -d prints it`).toEqual(readelfNeeded(f));
      // Every library we resolve is where the loader finds it.
      const loader = ldd(f);
      const ours = checkLibraries([f]).resolved.filter((x) => x.requiredBy === f);
      expect(ours.length).toBe(readElf(f).needed.length);
      for (const lib of ours) if (loader.has(lib.name)) expect(lib.path, `${lib.name} for ${path.basename(f)}`).toBe(loader.get(lib.name));
    }
    expect(r.stdout).toContain(`libonnxruntime.so.1                  ${path.join(BINDING, 'libonnxruntime.so.1')} (runpath)`);
  });

  it('fails, naming the library, when a file is copied without what it needs beside it', async () => {
    const dir = path.join(work, 'binding-alone');
    mkdirSync(dir);
    copyFileSync(path.join(BINDING, 'onnxruntime_binding.node'), path.join(dir, 'onnxruntime_binding.node'));
    expect(ldd(path.join(dir, 'onnxruntime_binding.node')).get('libonnxruntime.so.1')).toBe('not found');
    const r = await checkLibs([dir]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/libonnxruntime\.so\.1\s+NOT FOUND/);
    expect(r.stderr).toContain('1 shared library not found: libonnxruntime.so.1 (needed by onnxruntime_binding.node)');
  });

  it('fails a CUDA 13 provider on a base without CUDA 13, says which CUDA it wants, and passes once the library is on the path', async () => {
    const dir = path.join(work, 'cuda-provider');
    mkdirSync(dir);
    for (const f of ['libonnxruntime.so.1', 'onnxruntime_binding.node']) copyFileSync(path.join(BINDING, f), path.join(dir, f));
    const provider = path.join(dir, 'libonnxruntime_providers_cuda.so');
    withNeededRenamed(path.join(BINDING, 'libonnxruntime.so.1'), provider, 'ld-linux-x86-64.so.2', 'libcublasLt.so.13');
    expect(readelfNeeded(provider)).toContain('libcublasLt.so.13');
    expect(ldd(provider).get('libcublasLt.so.13')).toBe('not found');

    const missing = await checkLibs(['--require', 'libonnxruntime_providers_cuda.so', dir]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('libcublasLt.so.13 (needed by libonnxruntime_providers_cuda.so)');
    expect(missing.stderr).toContain('the provider links CUDA 13: use a CUDA 13.x base image');

    // A library of another machine (arm64) under the right name is skipped, by us as by the loader.
    const armDir = path.join(work, 'arm64-libs');
    mkdirSync(armDir);
    copyFileSync(path.join(BINDING, '..', 'arm64', 'libonnxruntime.so.1'), path.join(armDir, 'libcublasLt.so.13'));
    expect(ldd(provider, { LD_LIBRARY_PATH: armDir }).get('libcublasLt.so.13')).toBe('not found');
    expect((await checkLibs([dir], { LD_LIBRARY_PATH: armDir })).code).toBe(1);

    // An x86-64 library of that name on LD_LIBRARY_PATH satisfies both.
    const libDir = path.join(work, 'cuda-libs');
    mkdirSync(libDir);
    copyFileSync(path.join(BINDING, 'libonnxruntime.so.1'), path.join(libDir, 'libcublasLt.so.13'));
    const found = await checkLibs(['--require', 'libonnxruntime_providers_cuda.so', dir], { LD_LIBRARY_PATH: libDir });
    expect(found.code, found.stderr).toBe(0);
    expect(found.stdout).toContain(`libcublasLt.so.13                    ${path.join(libDir, 'libcublasLt.so.13')} (LD_LIBRARY_PATH)`);
    expect(ldd(provider, { LD_LIBRARY_PATH: libDir }).get('libcublasLt.so.13')).toBe(path.join(libDir, 'libcublasLt.so.13'));
  });

  it('fails when a required provider library is absent (the cuda build must have installed it)', async () => {
    const r = await checkLibs(['--require', 'libonnxruntime_providers_cuda.so', BINDING]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`libonnxruntime_providers_cuda.so: required but not found in ${BINDING}`);
  });
});
