/**
 * Wraps every method of an adapter so that its rejections pass through `translate` first: the
 * adapter's technology errors become core errors at the seam, in one place per adapter. Every
 * method of the adapters wrapped here returns a promise.
 */
export function translateErrors<T extends object>(target: T, translate: (err: unknown) => Error): T {
  const wrapped: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(target)) {
    if (typeof value !== 'function') {
      wrapped[key] = value;
      continue;
    }
    const method = value as (...args: unknown[]) => Promise<unknown>;
    wrapped[key] = async (...args: unknown[]) => {
      try {
        return await method.apply(target, args);
      } catch (err) {
        throw translate(err);
      }
    };
  }
  return wrapped as T;
}

/** Errors that are not Errors (a thrown string) as Errors, for translators that pass them on. */
export function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(typeof err === 'string' ? err : 'non-Error value thrown');
}
