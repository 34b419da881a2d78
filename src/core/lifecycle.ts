/** Small helpers for starting and stopping processes cleanly. */

/** Rejects if `promise` has not settled within `ms`, naming what was being waited for. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
    timer.unref();
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Runs every check (each bounded in time) and reports which failed. */
export async function readiness(checks: Record<string, () => Promise<void>>, timeoutMs = 2_000): Promise<{ ok: boolean; checks: Record<string, string> }> {
  const results = await Promise.all(
    Object.entries(checks).map(async ([name, check]) => {
      try {
        await withTimeout(check(), timeoutMs, name);
        return [name, 'ok'] as const;
      } catch (err) {
        return [name, `down: ${(err as Error).message}`] as const;
      }
    }),
  );
  return { ok: results.every(([, v]) => v === 'ok'), checks: Object.fromEntries(results) };
}
