import { readFileSync } from 'node:fs';

/**
 * Where a process's CPU time went, from the .cpuprofile that `node --cpu-prof` writes: self time
 * by function and by package (the node_modules folder, `node:` for Node's own JavaScript, `src`
 * for ours, `(native)` for code V8 does not attribute: syscalls, the collector). Idle time is
 * left out of the shares.
 */

interface CpuProfile {
  nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number } }>;
  samples: number[];
  timeDeltas: number[];
}

export interface ProfileSummary {
  /** Milliseconds sampled while the process was busy. */
  busyMs: number;
  byPackage: Array<{ name: string; share: number }>;
  topFrames: Array<{ frame: string; share: number }>;
}

function packageOf(url: string): string {
  if (url === '') return '(native)';
  if (url.startsWith('node:')) return 'node:';
  const m = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (m) return m[1]!;
  return /\/src\//.test(url) ? 'src' : url;
}

export function summarizeCpuProfile(file: string, top = 12): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const nodes = new Map(profile.nodes.map((n) => [n.id, n.callFrame]));
  const byFrame = new Map<string, number>();
  const byPackage = new Map<string, number>();
  let busy = 0;
  profile.samples.forEach((id, i) => {
    const frame = nodes.get(id);
    const dt = profile.timeDeltas[i] ?? 0;
    if (!frame || frame.functionName === '(idle)') return;
    busy += dt;
    const where = frame.url.replace(/^.*node_modules\//, '').replace(/^file:\/\/.*?\/src\//, 'src/');
    const label = `${frame.functionName || '(anonymous)'} ${where || '(native)'}${frame.url ? `:${frame.lineNumber + 1}` : ''}`;
    byFrame.set(label, (byFrame.get(label) ?? 0) + dt);
    const pkg = packageOf(frame.url);
    byPackage.set(pkg, (byPackage.get(pkg) ?? 0) + dt);
  });
  const shares = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).slice(0, top);
  return {
    busyMs: busy / 1000,
    byPackage: shares(byPackage).map(([name, t]) => ({ name, share: t / busy })),
    topFrames: shares(byFrame).map(([frame, t]) => ({ frame, share: t / busy })),
  };
}
