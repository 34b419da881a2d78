/**
 * Dockerfile.api, Dockerfile.worker and .dockerignore checked without Docker: stages, COPY
 * sources present and not excluded, users, ports, health checks, commands; for the worker, that
 * the CUDA provider onnxruntime-node would download is the one the base image was chosen for, and
 * that the image build runs the shared-library check (its command is run here on the CPU files).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { findWebDir } from '../../src/api/web.js';
import { API_PORT, cmdOf, copyArgs, dockerfileOf, dockerignored, expand, ops, read, rel, WORKER_PORT, type Stage } from '../support/deploy-files.js';

const run = promisify(execFile);

function checkDockerfile(p: string, variants: Record<string, string | undefined>[]) {
  for (const vars of variants) {
    const df = dockerfileOf(p);
    const args = { ...df.args, ...vars };
    const names = new Set<string>();
    for (const stage of df.stages) {
      const from = expand(stage.from, args);
      // A FROM naming a stage must name an earlier one; otherwise it is an image reference.
      if (/^runtime-|^build$|^deps$/.test(from)) expect(names, `${p} (${JSON.stringify(vars)}): FROM ${from}`).toContain(from);
      for (const c of ops(stage, 'COPY').map(copyArgs)) {
        const fromFlag = c.flags.find((f) => f.startsWith('--from='))?.slice('--from='.length);
        if (fromFlag) {
          if (!fromFlag.includes(':')) expect(names, `${p}: COPY --from=${fromFlag}`).toContain(fromFlag);
          continue;
        }
        for (const s of c.sources) {
          expect(existsSync(rel(s)), `${p}: COPY ${s} (not in the repository)`).toBe(true);
          expect(dockerignored(s.replace(/^\.\//, '').replace(/\/$/, '')), `${p}: COPY ${s} is excluded by .dockerignore`).toBe(false);
        }
      }
      if (stage.name) names.add(stage.name);
    }
    const user = ops(df.stages.at(-1)!, 'USER').at(-1);
    expect(user, `${p}: final stage runs as a non-root USER`).toBeDefined();
    expect(user!.split(':')[0]).not.toMatch(/^(root|0)$/);
  }
}

/** The RUN lines of a stage in order, with the COPY sources seen before each. */
function runsAfterCopies(stage: Stage): { run: string; copied: string[] }[] {
  const copied: string[] = [];
  const out: { run: string; copied: string[] }[] = [];
  for (const i of stage.body) {
    if (i.op === 'COPY') copied.push(...copyArgs(i.args).sources);
    if (i.op === 'RUN') out.push({ run: i.args, copied: [...copied] });
  }
  return out;
}

/** The build stage: npm ci (which generates the Prisma client) with .npmrc, then the build (`script`: npm run build, or build:server without the web page). */
function checkBuildStage(p: string, script = 'build', sources = ['tsconfig.json', 'tsconfig.build.json', 'src']) {
  const build = dockerfileOf(p).stages.find((s) => s.name === 'build');
  expect(build, `${p}: a build stage`).toBeDefined();
  expect(build!.from).toBe('${NODE_IMAGE}');
  const runs = runsAfterCopies(build!);
  const ci = runs.find((r) => /^npm ci$/.test(r.run));
  expect(ci, `${p}: npm ci with dev dependencies`).toBeDefined();
  for (const f of ['.npmrc', 'package-lock.json', 'scripts/prisma-generate.mjs', 'prisma.config.ts', 'prisma'])
    expect(ci!.copied, `${p}: ${f} before npm ci`).toContain(f);
  const b = runs.find((r) => r.run === `npm run ${script}`);
  expect(b, `${p}: npm run ${script}`).toBeDefined();
  for (const f of sources)
    expect(
      b!.copied.map((s) => s.replace(/^\.\//, '')),
      `${p}: ${f} before the build`,
    ).toContain(f);
  expect(read('.npmrc')).toMatch(/^onnxruntime-node-install=skip$/m);
}

describe('Dockerfile.api', () => {
  const df = dockerfileOf('Dockerfile.api');
  const runtime = df.stages.at(-1)!;

  it('builds on node:22-bookworm-slim: npm ci, Prisma client, npm run build (the code and the web page)', () => {
    expect(df.args.NODE_IMAGE).toBe('node:22-bookworm-slim');
    checkBuildStage('Dockerfile.api', 'build', ['tsconfig.json', 'tsconfig.build.json', 'src', 'web']);
    // `npm run build` is what makes the page: tsc, then Vite into dist/web, where the API finds it beside dist/src.
    const scripts = (JSON.parse(read('package.json')) as { scripts: Record<string, string> }).scripts;
    expect(scripts.build).toBe('npm run build:server && npm run build:web');
    expect(scripts['build:web']).toBe('vite build --config web/vite.config.ts');
    expect(read('web/vite.config.ts')).toContain("new URL('../dist/web', import.meta.url)");
    // The page's own files, and Vite's config, are in the build context.
    for (const f of ['web', 'web/index.html', 'web/vite.config.ts', 'web/src', 'web/public']) expect(dockerignored(f), f).toBe(false);
  });

  it('ships production dependencies, dist/, bin/ and the migrations, as a non-root user', () => {
    checkDockerfile('Dockerfile.api', [{}]);
    expect(ops(runtime, 'RUN').join('\n')).toMatch(/npm ci --omit=dev/);
    const copies = ops(runtime, 'COPY').map(copyArgs);
    expect(copies).toContainEqual({ flags: ['--from=build'], sources: ['/app/dist'], dest: './dist' });
    expect(copies.flatMap((c) => c.sources)).toEqual(expect.arrayContaining(['bin', 'prisma', 'package.json']));
    expect(existsSync(rel('prisma/migrations'))).toBe(true);
  });

  it('finds the page the build put beside the code: /app/dist/web from /app/dist/src/api, as in the image', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 't2i-image-layout-'));
    try {
      await mkdir(path.join(root, 'app/dist/src/api'), { recursive: true });
      expect(findWebDir(path.join(root, 'app/dist/src/api'))).toBeUndefined();
      await mkdir(path.join(root, 'app/dist/web'), { recursive: true });
      await writeFile(path.join(root, 'app/dist/web/index.html'), '<!doctype html>');
      expect(findWebDir(path.join(root, 'app/dist/src/api'))).toBe(path.join(root, 'app/dist/web'));
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it('exposes the API port, health-checks /healthz and runs `t2i api`', () => {
    expect(ops(runtime, 'EXPOSE')).toEqual([String(API_PORT)]);
    const hc = ops(runtime, 'HEALTHCHECK').join(' ');
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.PORT || ${API_PORT}`);
    expect(cmdOf(runtime)).toEqual(['node', 'bin/t2i.js', 'api']);
  });
});

/** The onnxruntime-node install script's own metadata: which manifests a platform has and which NuGet package and version they come from. */
function ortInstallMetadata() {
  const require = createRequire(import.meta.url);
  const meta = z
    .object({
      requirements: z.record(z.string(), z.array(z.string())),
      manifests: z.record(z.string(), z.record(z.string(), z.object({ package: z.string(), path: z.string() }))),
      packages: z.record(z.string(), z.object({ name: z.string(), versions: z.array(z.object({ feed: z.string(), version: z.string() })) })),
    })
    .parse(require('onnxruntime-node/script/install-metadata.js'));
  const version = z.object({ version: z.string() }).parse(require('onnxruntime-node/package.json')).version;
  return { meta, version };
}

describe('Dockerfile.worker', () => {
  const df = dockerfileOf('Dockerfile.worker');
  const runtime = df.stages.at(-1)!;
  const deps = df.stages.find((s) => s.name === 'deps')!;

  it('selects a CUDA 13 + cuDNN 9 or a plain Node runtime by VARIANT', () => {
    expect(df.args.VARIANT).toBe('cuda');
    expect(df.args.CUDA_IMAGE).toMatch(/^nvidia\/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04$/);
    expect(df.args.NODE_IMAGE).toBe('node:22-bookworm-slim');
    expect(runtime.from).toBe('runtime-${VARIANT}');
    const byName = new Map(df.stages.map((s) => [s.name ?? '', s.from]));
    expect(byName.get('runtime-cuda')).toBe('${CUDA_IMAGE}');
    expect(byName.get('runtime-cpu')).toBe('${NODE_IMAGE}');
    const cuda = df.stages.find((s) => s.name === 'runtime-cuda')!;
    expect(ops(cuda, 'COPY')).toContain('--from=deps /usr/local/bin/node /usr/local/bin/node');
    // Ubuntu 24.04 images ship a user with uid 1000: it must go before ours takes that uid.
    expect(ops(cuda, 'RUN').join(' ')).toMatch(/userdel --remove ubuntu.*useradd --uid 1000/);
  });

  it('builds like the API and ships dist/ and bin/, as a non-root user, for both variants', () => {
    checkBuildStage('Dockerfile.worker', 'build:server');
    checkDockerfile('Dockerfile.worker', [{ VARIANT: 'cuda' }, { VARIANT: 'cpu' }]);
    const copies = ops(runtime, 'COPY').map(copyArgs);
    expect(copies).toContainEqual({ flags: ['--from=build'], sources: ['/app/dist'], dest: './dist' });
    expect(copies).toContainEqual({ flags: ['--from=deps'], sources: ['/app/node_modules'], dest: './node_modules' });
  });

  it("installs the CUDA provider of this onnxruntime-node's own install metadata, and drops the TensorRT one", () => {
    const run = ops(deps, 'RUN').join('\n');
    expect(run).toMatch(/npm ci --omit=dev/);
    const flag = /cuda\) ONNXRUNTIME_NODE_INSTALL=(\w+) node node_modules\/onnxruntime-node\/script\/install\.js/.exec(run)?.[1];
    const { meta, version } = ortInstallMetadata();
    // The value must name a manifest the installed version knows, or its script throws at build time.
    expect(meta.requirements['linux/x64']).toContain(flag);
    const manifest = meta.manifests[`linux/x64:${flag!}`]!;
    expect(Object.keys(manifest)).toContain('./libonnxruntime_providers_cuda.so');
    const pkg = meta.packages[manifest['./libonnxruntime_providers_cuda.so']!.package]!;
    // What the comment above CUDA_IMAGE explains: the default GPU NuGet package of this very version.
    expect(pkg).toEqual({ name: 'Microsoft.ML.OnnxRuntime.Gpu.Linux', versions: [{ feed: 'nuget', version }] });
    expect(read('Dockerfile.worker')).toContain(`Microsoft.ML.OnnxRuntime.Gpu.Linux ${version} on nuget.org`);
    expect(run).toContain('rm -f node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_tensorrt.so');
  });

  it('proves its provider at build time: check-libs runs in the final stage, after the code, before USER', () => {
    const body = runtime.body;
    const at = body.findIndex((i) => i.op === 'RUN' && i.args.includes('check-libs'));
    expect(at, 'a RUN of check-libs in the final stage (BuildKit skips stages the target does not use)').toBeGreaterThan(0);
    expect(body.findIndex((i) => i.op === 'COPY' && i.args.includes('/app/dist'))).toBeLessThan(at);
    expect(body.findIndex((i) => i.op === 'USER')).toBeGreaterThan(at);
    const step = body[at]!.args;
    expect(step).toContain('cuda) node bin/t2i.js check-libs --driver-at-runtime --require libonnxruntime_providers_cuda.so ;;');
    expect(step).toContain('*) node bin/t2i.js check-libs ;;');
  });

  it("runs the CPU variant's check-libs step here, on this machine's CPU binding, and it passes", async () => {
    const step = ops(runtime, 'RUN').find((r) => r.includes('check-libs'))!;
    const cpu = /\*\) (node bin\/t2i\.js check-libs[^;]*);;/.exec(step)![1]!.trim().split(/\s+/);
    const { stdout } = await run(process.execPath, cpu.slice(1), { cwd: rel('') });
    expect(stdout).toMatch(/libonnxruntime\.so\.1 .*\(runpath\)/);
    expect(stdout).toMatch(/0 libraries not found\n$/);
  });

  it('keeps the model out of the image: /models mounted, MODEL_URI synced into a writable cache', () => {
    expect(ops(runtime, 'VOLUME')).toEqual(['["/models", "/var/cache/t2i"]']);
    const env = ops(runtime, 'ENV').join(' ');
    expect(env).toMatch(/MODEL_DIR=\/models\b/);
    expect(env).toMatch(/MODEL_CACHE_DIR=\/var\/cache\/t2i\b/);
    const runs = ops(runtime, 'RUN').join('\n');
    expect(runs).toContain('mkdir -p /var/cache/t2i && chown 1000:1000 /var/cache/t2i');
  });

  it('exposes the metrics port, health-checks /healthz and runs `t2i worker`', () => {
    expect(ops(runtime, 'EXPOSE')).toEqual([String(WORKER_PORT)]);
    const hc = ops(runtime, 'HEALTHCHECK').join(' ');
    expect(hc).toContain('/healthz');
    expect(hc).toContain(`process.env.WORKER_METRICS_PORT || ${WORKER_PORT}`);
    expect(cmdOf(runtime)).toEqual(['node', 'bin/t2i.js', 'worker']);
  });

  it('states in docs/deployment.md the driver the base image needs', () => {
    // NVIDIA's minimum drivers for a CUDA major version (minor version compatibility).
    const minDriver: Record<string, number> = { '12': 525, '13': 580 };
    const major = /nvidia\/cuda:(\d+)\./.exec(df.args.CUDA_IMAGE!)![1]!;
    const doc = read('docs/deployment.md');
    expect(doc).toContain(`CUDA ${major}`);
    expect(doc).toMatch(new RegExp(`NVIDIA driver (version )?${minDriver[major]!} or newer`));
  });
});

describe('.dockerignore', () => {
  it('keeps secrets, local state and dependencies out of the build context', () => {
    for (const f of ['.env', '.env.local', 'node_modules', 'dist', '.git', 'src/generated', 'models', '.t2i']) expect(dockerignored(f), f).toBe(true);
    for (const f of ['src', 'bin', 'prisma', 'package.json', 'package-lock.json', '.npmrc', 'scripts/prisma-generate.mjs'])
      expect(dockerignored(f), f).toBe(false);
  });
});
