/**
 * numpy-compatible numeric helpers. diffusers builds its timestep lists with numpy, and
 * reproducing them to the integer needs numpy's exact floating-point recipes: which
 * expression yields each element, and round-half-to-even rather than JavaScript's
 * round-half-up (e.g. np.round(937.5) is 938 but np.round(812.5) is 812).
 */

/** np.round / np.rint on a float64: ties go to the even integer. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  // Math.round sends every tie up; pull the odd ones back down.
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * np.arange(start, stop, step) over float64. numpy sizes the result as
 * ceil((stop - start) / step) and fills element i as start + i * ((start + step) - start),
 * so a step that is not exactly representable can yield one more element, or slightly
 * different values, than a naive loop would.
 */
export function npArange(start: number, stop: number, step: number): Float64Array {
  if (step === 0 || !Number.isFinite(step)) throw new Error(`arange step must be a finite non-zero number, got ${step}`);
  const length = Math.max(0, Math.ceil((stop - start) / step));
  const out = new Float64Array(length);
  const delta = start + step - start;
  for (let i = 0; i < length; i++) out[i] = i === 0 ? start : i === 1 ? start + step : start + i * delta;
  return out;
}

/**
 * np.linspace(start, stop, num, endpoint). Element i is i * step + start with
 * step = (stop - start) / (endpoint ? num - 1 : num); with the endpoint, the last
 * element is exactly `stop`.
 */
export function npLinspace(start: number, stop: number, num: number, endpoint = true): Float64Array {
  if (!Number.isInteger(num) || num < 0) throw new Error(`linspace num must be a non-negative integer, got ${num}`);
  const out = new Float64Array(num);
  const div = endpoint ? num - 1 : num;
  if (div <= 0) {
    if (num === 1) out[0] = start;
    return out;
  }
  const step = (stop - start) / div;
  for (let i = 0; i < num; i++) out[i] = i * step + start;
  if (endpoint) out[num - 1] = stop;
  return out;
}

/**
 * np.interp(x, xp, fp) for one point: piecewise-linear, clamped to fp's end values outside
 * [xp[0], xp[-1]]. xp must be increasing. Inside an interval numpy evaluates
 * slope * (x - xp[j]) + fp[j], and so does this, to the last bit.
 */
export function npInterp(x: number, xp: ArrayLike<number>, fp: ArrayLike<number>): number {
  const n = xp.length;
  if (n === 0 || fp.length !== n) throw new Error(`interp needs xp and fp of the same non-zero length, got ${n} and ${fp.length}`);
  if (x <= xp[0]!) return fp[0]!;
  if (x >= xp[n - 1]!) return fp[n - 1]!;
  let lo = 0;
  let hi = n - 1;
  // Invariant: xp[lo] <= x < xp[hi].
  while (hi - lo > 1) {
    const mid = (lo + hi) >>> 1;
    if (xp[mid]! <= x) lo = mid;
    else hi = mid;
  }
  const slope = (fp[hi]! - fp[lo]!) / (xp[hi]! - xp[lo]!);
  return slope * (x - xp[lo]!) + fp[lo]!;
}
