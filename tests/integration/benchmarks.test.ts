/**
 * The benchmarks keep working: each bench command, in its shortest form, runs to the end on its
 * own throwaway services, exits 0 and prints every figure with its goal. The figures themselves
 * come from full runs on a quiet machine (README, Benchmarks); this only keeps the commands from
 * breaking unnoticed (a schema change they did not follow, a flag that went away).
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { BIN } from '../support/processes.js';

const run = promisify(execFile);

async function bench(args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [BIN, 'bench', ...args], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME },
    timeout: 240_000,
    maxBuffer: 16 * 2 ** 20,
  });
  return stdout;
}

describe('benchmark commands', () => {
  it('bench service: intake beside bare Fastify, the profile, the per-job overhead, each with its goal', { timeout: 300_000 }, async () => {
    const out = await bench(['service', '--rounds', '1', '--duration', '1', '--warmup', '1', '--connections', '4', '--jobs', '5']);
    expect(out).toMatch(/median: real \d+ req\/s/);
    expect(out).toMatch(/throughput ratio real\/bare = \d\.\d+/);
    expect(out).toMatch(/goal: >= 3000 accepted\/s with p99 < 50 ms: (met|NOT MET)/);
    expect(out).toMatch(/top frames by self time:\n\s+\d+\.\d%/);
    expect(out).toMatch(/enqueue->stored .* p50 \d+\.\d+ ms\s+p99 \d+\.\d+ ms/);
    expect(out).toMatch(/goal: p50 <= 15 ms, p99 <= 50 ms\s+(met|NOT MET)/);
    expect(out).toMatch(/non-2xx: real 0, bare 0; errors: real 0, bare 0/);
    expect(out).toContain('worker errors: 0  OK');
  });

  it('bench stream: step-to-event latency with its goal', { timeout: 300_000 }, async () => {
    const out = await bench(['stream', '--jobs', '2', '--steps', '5', '--subscribers', '1']);
    expect(out).toMatch(/progress event, worker step -> client: .*p50/);
    expect(out).toMatch(/goal: p50 <= \d+ ms and p99 <= \d+ ms: (met|MISSED) \(p50 \d+\.\d+ ms, p99 \d+\.\d+ ms\)/);
  });
});
