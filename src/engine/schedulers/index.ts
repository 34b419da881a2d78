import { DdimScheduler } from './ddim.js';
import { DpmSolverMultistepScheduler } from './dpm-solver.js';
import { EulerAncestralScheduler } from './euler-ancestral.js';
import { EulerDiscreteScheduler } from './euler.js';
import { LcmScheduler } from './lcm.js';
import { PndmScheduler } from './pndm.js';
import { SCHEDULER_NAMES, type Scheduler, type SchedulerConfig, type SchedulerName } from './types.js';

export * from './types.js';

/** diffusers' class names, as `_class_name` in scheduler_config.json. */
const BY_CLASS: Record<string, SchedulerName> = {
  PNDMScheduler: 'pndm',
  DDIMScheduler: 'ddim',
  EulerDiscreteScheduler: 'euler',
  EulerAncestralDiscreteScheduler: 'euler_ancestral',
  DPMSolverMultistepScheduler: 'dpmpp_2m',
  LCMScheduler: 'lcm',
};

export function isSchedulerName(name: string): name is SchedulerName {
  return (SCHEDULER_NAMES as readonly string[]).includes(name);
}

/** The scheduler a model directory ships with, or undefined when we do not implement its class. */
export function schedulerForClass(className: unknown): SchedulerName | undefined {
  return typeof className === 'string' ? BY_CLASS[className] : undefined;
}

/**
 * A scheduler built from a model's scheduler_config.json the way diffusers'
 * `XScheduler.from_config(config)` does: keys in the file win, the algorithm's defaults fill in.
 * DPM-Solver++ 2M uses Karras sigmas unless the file says otherwise.
 */
export function createScheduler(name: SchedulerName, config: SchedulerConfig = {}): Scheduler {
  switch (name) {
    case 'pndm':
      return new PndmScheduler(config);
    case 'ddim':
      return new DdimScheduler(config);
    case 'euler':
      return new EulerDiscreteScheduler(config);
    case 'euler_ancestral':
      return new EulerAncestralScheduler(config);
    case 'dpmpp_2m':
      return new DpmSolverMultistepScheduler({ use_karras_sigmas: true, ...config });
    case 'lcm':
      return new LcmScheduler(config);
  }
}
