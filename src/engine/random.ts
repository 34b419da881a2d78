import type { NoiseSource } from './schedulers/types.js';

/**
 * Seeded normal noise that reproduces the two generators Stable Diffusion users compare
 * against, bit for bit:
 *
 * - `NumpyRandomState`: numpy's legacy `np.random.RandomState(seed).randn(...)`, which
 *   diffusers' `OnnxStableDiffusionPipeline` uses for the initial latents. MT19937 seeded
 *   with init_genrand, 53-bit doubles, Marsaglia's polar method with the second value cached.
 * - `TorchGenerator`: `torch.manual_seed(seed)` then `torch.randn(n)` on CPU in float32, which
 *   diffusers' scheduler tests (and its torch pipelines) draw from. Same MT19937, 24-bit
 *   floats, Box-Muller over blocks of 16 values.
 *
 * Seeds are integers in [0, 2^32 - 1], the range numpy's legacy seeding accepts.
 */

export const MAX_SEED = 0xffffffff;

const N = 624;
const M = 397;

/** The 32-bit Mersenne Twister (Matsumoto & Nishimura 1998) with its reference seeding. */
export class MT19937 {
  private readonly mt = new Uint32Array(N);
  private mti = N + 1;

  constructor(seed: number) {
    assertSeed(seed);
    const mt = this.mt;
    mt[0] = seed >>> 0;
    for (let i = 1; i < N; i++) {
      const prev = mt[i - 1]! ^ (mt[i - 1]! >>> 30);
      // 1812433253 * prev overflows 2^53 in doubles: Math.imul keeps the low 32 bits exactly.
      mt[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
    this.mti = N;
  }

  /** Next 32-bit unsigned integer. */
  nextUint32(): number {
    const mt = this.mt;
    if (this.mti >= N) {
      for (let k = 0; k < N; k++) {
        const y = (mt[k]! & 0x80000000) | (mt[(k + 1) % N]! & 0x7fffffff);
        mt[k] = mt[(k + M) % N]! ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
      }
      this.mti = 0;
    }
    let y = mt[this.mti++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** A double in [0, 1) with 53 random bits (numpy's random_double / genrand_res53). */
  nextDouble(): number {
    const a = this.nextUint32() >>> 5;
    const b = this.nextUint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }
}

export class NumpyRandomState implements NoiseSource {
  private readonly mt: MT19937;
  private cachedGauss: number | null = null;

  constructor(seed: number) {
    this.mt = new MT19937(seed);
  }

  /** One N(0, 1) double, as numpy's legacy_gauss. */
  gauss(): number {
    if (this.cachedGauss !== null) {
      const g = this.cachedGauss;
      this.cachedGauss = null;
      return g;
    }
    let x1: number;
    let x2: number;
    let r2: number;
    do {
      x1 = 2 * this.mt.nextDouble() - 1;
      x2 = 2 * this.mt.nextDouble() - 1;
      r2 = x1 * x1 + x2 * x2;
    } while (r2 >= 1 || r2 === 0);
    const f = Math.sqrt((-2 * Math.log(r2)) / r2);
    // numpy returns f*x2 first and keeps f*x1 for the next call.
    this.cachedGauss = f * x1;
    return f * x2;
  }

  /** `randn(n)` in float64, exactly numpy's values. */
  randnFloat64(n: number): Float64Array {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = this.gauss();
    return out;
  }

  /** `randn(n).astype(np.float32)`: what the ONNX pipeline feeds the UNet. */
  randn(n: number): Float32Array {
    return Float32Array.from(this.randnFloat64(n));
  }
}

export class TorchGenerator implements NoiseSource {
  private readonly mt: MT19937;

  constructor(seed: number) {
    this.mt = new MT19937(seed);
  }

  /** torch's uniform_real_distribution<float>(0, 1): the low 24 bits of one draw. */
  private uniform(): number {
    return (this.mt.nextUint32() & 0xffffff) * 2 ** -24;
  }

  /**
   * `torch.randn(n)` on CPU, float32. For n >= 16 torch fills n uniforms, transforms them in
   * blocks of 16 (Box-Muller pairing j with j + 8) and, when n is not a multiple of 16, draws
   * 16 fresh uniforms for the last (overlapping) block. Smaller tensors use a scalar path
   * this class does not reproduce.
   */
  randn(n: number): Float32Array {
    if (n < 16) throw new Error(`TorchGenerator.randn reproduces torch only for n >= 16, got ${n}`);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = this.uniform();
    for (let i = 0; i + 16 <= n; i += 16) boxMuller16(data, i);
    if (n % 16 !== 0) {
      const start = n - 16;
      for (let i = 0; i < 16; i++) data[start + i] = this.uniform();
      boxMuller16(data, start);
    }
    return data;
  }
}

function boxMuller16(data: Float32Array, offset: number): void {
  const f = Math.fround;
  for (let j = 0; j < 8; j++) {
    const u1 = f(1 - data[offset + j]!);
    const u2 = data[offset + j + 8]!;
    const radius = f(Math.sqrt(f(-2 * f(Math.log(u1)))));
    const theta = f(2 * Math.PI * u2);
    data[offset + j] = f(radius * f(Math.cos(theta)));
    data[offset + j + 8] = f(radius * f(Math.sin(theta)));
  }
}

function assertSeed(seed: number): void {
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) {
    throw new RangeError(`seed must be an integer from 0 to ${MAX_SEED}, got ${seed}`);
  }
}

/** A fresh random seed in numpy's legacy range, for generations that did not ask for one. */
export function randomSeed(): number {
  return (Math.random() * 2 ** 32) >>> 0;
}
