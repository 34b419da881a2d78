import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { checkLibraries, sharedObjectsIn, type LibraryCheck } from '../adapters/elf.js';
import { bindingDir } from '../engine/onnx/runtime.js';
import { UsageError } from './engine-commands.js';

/**
 * `t2i check-libs [DIR|FILE ...] [--require NAME ...] [--driver-at-runtime]`: lists the shared
 * libraries each native file needs and where the loader finds them, and fails naming every one
 * that is missing. Dockerfile.worker runs it after installing the CUDA provider, so an image
 * whose base lacks a library the provider links does not build.
 */
export const checkLibsCommand = (argv: string[]): Promise<void> => Promise.resolve().then(() => checkLibs(argv));

function checkLibs(argv: string[]): void {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      require: { type: 'string', multiple: true },
      // At build time there is no GPU: libcuda.so.1 is mounted when a container starts with one.
      'driver-at-runtime': { type: 'boolean', default: false },
    },
  });
  const targets = positionals.length > 0 ? positionals : [bindingDir() ?? ''];
  const files: string[] = [];
  for (const t of targets) {
    if (!t || !existsSync(t)) throw new UsageError(`${t || 'onnxruntime-node'}: not found (expected a folder of shared libraries or a shared library)`);
    files.push(...(statSync(t).isDirectory() ? sharedObjectsIn(t) : [path.resolve(t)]));
  }
  for (const name of values.require ?? []) {
    if (!files.some((f) => path.basename(f) === name)) {
      throw new UsageError(`${name}: required but not found in ${targets.join(', ')}`);
    }
  }
  if (files.length === 0) throw new UsageError(`no shared libraries in ${targets.join(', ')}`);

  // Files checked together are the ones a process loads together: a provider's
  // libonnxruntime_providers_shared.so is opened by onnxruntime before the provider itself.
  const preloaded = new Map(files.map((f) => [path.basename(f), f]));
  const check = checkLibraries(files, { preloaded });
  process.stdout.write(formatCheck(files, check));
  const missing = [...check.missing, ...(values['driver-at-runtime'] ? [] : check.driver)];
  if (missing.length > 0) throw new UsageError(missingMessage(missing));
}

export function formatCheck(files: string[], check: LibraryCheck): string {
  const lines: string[] = [];
  const all = [...check.resolved, ...check.missing, ...check.driver];
  for (const f of files) {
    lines.push(f);
    for (const r of all.filter((x) => x.requiredBy === f)) {
      lines.push(
        `  ${r.name.padEnd(36)} ${r.path ? `${r.path} (${r.via})` : check.driver.includes(r) ? 'not here: a driver library, mounted with the GPU' : 'NOT FOUND'}`,
      );
    }
  }
  const deeper = check.missing.filter((m) => !files.includes(m.requiredBy));
  for (const m of deeper) lines.push(`${m.requiredBy}\n  ${m.name.padEnd(36)} NOT FOUND`);
  lines.push(`${check.objects.length} shared objects checked, ${check.missing.length} libraries not found`);
  return `${lines.join('\n')}\n`;
}

/** Names each missing library and, for CUDA libraries, which CUDA/cuDNN major version the provider wants. */
export function missingMessage(missing: { name: string; requiredBy: string }[]): string {
  const list = missing.map((m) => `${m.name} (needed by ${path.basename(m.requiredBy)})`).join(', ');
  const cuda = missing.map((m) => /^lib(?:cudart|cublas|cublasLt)\.so\.(\d+)$/.exec(m.name)?.[1]).find(Boolean);
  const cudnn = missing.map((m) => /^libcudnn\.so\.(\d+)$/.exec(m.name)?.[1]).find(Boolean);
  const hint = [
    cuda ? `the provider links CUDA ${cuda}: use a CUDA ${cuda}.x base image (CUDA_IMAGE in Dockerfile.worker)` : '',
    cudnn ? `it links cuDNN ${cudnn}: use a base image with cuDNN ${cudnn} (a "-cudnn-runtime" tag)` : '',
  ].filter(Boolean);
  return `${missing.length} shared ${missing.length === 1 ? 'library' : 'libraries'} not found: ${list}${hint.length ? `; ${hint.join('; ')}` : ''}`;
}
