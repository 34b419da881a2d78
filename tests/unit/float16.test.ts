import { describe, expect, it } from 'vitest';
import { float32ToHalfBits, fromHalf, halfBitsToFloat32, toHalf } from '../../src/engine/float16.js';

describe('float16 conversion', () => {
  it('encodes known values as numpy does', () => {
    // np.array([...], np.float16).view(np.uint16)
    const cases: Array<[number, number]> = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3c00],
      [-2, 0xc000],
      [0.5, 0x3800],
      [65504, 0x7bff],
      [65520, 0x7c00],
      [1e-8, 0x0000],
      [6.103515625e-5, 0x0400],
      [5.960464477539063e-8, 0x0001],
      [0.1, 0x2e66],
      [Infinity, 0x7c00],
      [-Infinity, 0xfc00],
      [1.00048828125, 0x3c00],
      [1.00146484375, 0x3c02],
    ];
    for (const [v, bits] of cases) expect([v, toHalf(v)]).toEqual([v, bits]);
    expect(toHalf(NaN) & 0x7c00).toBe(0x7c00);
  });

  it('round-trips every finite half value exactly', () => {
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) === 0x7c00) continue;
      expect(toHalf(fromHalf(h))).toBe(h);
    }
  });

  it('converts arrays both ways within half precision', () => {
    const src = Float32Array.from([0.123, -4.5, 1000.25, 3e-5]);
    const back = halfBitsToFloat32(float32ToHalfBits(src));
    src.forEach((v, i) => expect(Math.abs(back[i]! - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -11 + 2 ** -25));
  });
});
