import { describe, expect, it } from 'vitest';
import { MT19937, NumpyRandomState, TorchGenerator } from '../../src/engine/random.js';

describe('MT19937', () => {
  it('matches the reference generator (init_genrand(5489) first outputs)', () => {
    const mt = new MT19937(5489);
    expect([mt.nextUint32(), mt.nextUint32(), mt.nextUint32()]).toEqual([3499211612, 581869302, 3890346734]);
  });
});

describe('NumpyRandomState.randn', () => {
  it('reproduces np.random.RandomState(0).randn exactly', () => {
    expect(Array.from(new NumpyRandomState(0).randnFloat64(4))).toEqual([1.764052345967664, 0.4001572083672233, 0.9787379841057392, 2.240893199201458]);
  });

  it('reproduces np.random.RandomState(42).randn exactly', () => {
    expect(Array.from(new NumpyRandomState(42).randnFloat64(4))).toEqual([0.4967141530112327, -0.13826430117118466, 0.6476885381006925, 1.5230298564080254]);
  });

  it('continues the stream across calls, including an odd split', () => {
    const whole = new NumpyRandomState(7).randnFloat64(5);
    const r = new NumpyRandomState(7);
    const parts = [...r.randnFloat64(3), ...r.randnFloat64(2)];
    expect(parts).toEqual(Array.from(whole));
  });

  it('accepts the full numpy seed range and rejects anything else', () => {
    expect(() => new NumpyRandomState(2 ** 32 - 1)).not.toThrow();
    expect(() => new NumpyRandomState(-1)).toThrow(/seed must be an integer from 0 to 4294967295/);
    expect(() => new NumpyRandomState(2 ** 32)).toThrow(RangeError);
    expect(() => new NumpyRandomState(1.5)).toThrow(RangeError);
  });
});

describe('TorchGenerator.randn', () => {
  it('reproduces torch.manual_seed(0); torch.randn(16)', () => {
    // torch 2.x CPU: torch.manual_seed(0); torch.randn(16)
    const expected = [
      -1.1258398, -1.1523602, -0.2505786, -0.4338788, 0.8487103, 0.6920092, -0.3160127, -2.1152194, 0.3222749, -1.2633348, 0.3499832, 0.3081339, 0.1198415,
      1.2376579, 1.1167772, -0.2472782,
    ];
    const got = Array.from(new TorchGenerator(0).randn(16));
    got.forEach((v, i) => expect(v).toBeCloseTo(expected[i]!, 5));
  });
});
