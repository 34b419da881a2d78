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

/**
 * Runs every check (each bounded in time) and says which are down. `checks` is public (names and
 * ok/down); `errors` holds why, for logs only (their messages may name hosts and ports).
 */
export async function readiness(
  checks: Record<string, () => Promise<void>>,
  timeoutMs = 2_000,
): Promise<{ ok: boolean; checks: Record<string, 'ok' | 'down'>; errors: Record<string, string> }> {
  const results = await Promise.all(
    Object.entries(checks).map(async ([name, check]) => {
      try {
        await withTimeout(check(), timeoutMs, name);
        return [name, undefined] as const;
      } catch (err) {
        return [name, err instanceof Error ? err.message : 'failed'] as const;
      }
    }),
  );
  const errors = Object.fromEntries(results.filter((r): r is readonly [string, string] => r[1] !== undefined));
  return {
    ok: Object.keys(errors).length === 0,
    checks: Object.fromEntries(results.map(([name, e]) => [name, e === undefined ? 'ok' : 'down'])),
    errors,
  };
}
