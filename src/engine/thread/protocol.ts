import type { ProviderChoice } from '../onnx/runtime.js';
import type { GenerateParams, Generation, ModelDefaults, Progress } from '../params.js';
import type { SchedulerName } from '../schedulers/types.js';

/** Messages between the host and the engine thread. Plain data: structured-clone safe. */

/** What the thread loads: an ONNX export, or the test double (testing/test-pipeline.ts), and how it batches. */
export type ThreadInit = ({ kind: 'onnx'; modelDir: string; provider: ProviderChoice; threads?: number } | { kind: 'test'; stepMs: number }) & {
  /** Most generations per UNet run (BATCH_MAX). */
  batchMax: number;
  /** Longest the first generation in line waits for others to share its batch (BATCH_WAIT_MS). */
  batchWaitMs: number;
};

export interface EngineInfo {
  modelDir: string;
  provider: string;
  defaultScheduler: SchedulerName | undefined;
  /** What loading found: "SD 1.x", "SDXL Turbo", "SD 2.x v-prediction inpainting", ... */
  variant?: string;
  /** What a request that leaves parameters out gets on this model. */
  defaults?: ModelDefaults;
  /** What the model can take, for the service to refuse requests it cannot run (absent: text-to-image only). */
  inputs?: { family: 'sd' | 'sdxl' | 'test'; inpainting: boolean; imageInputs: boolean };
  loadMs: number;
  sizeBytes: number;
  /** Most generations one UNet run takes here (1: one at a time), and why, in one line. */
  batching: { max: number; summary: string };
}

export type ToThread =
  | { type: 'generate'; id: number; params: GenerateParams; previewEvery: number; returnLatents: boolean; alone: boolean }
  | { type: 'cancel'; id: number }
  | { type: 'close' };

export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
}

export type FromThread =
  | { type: 'ready'; info: EngineInfo }
  | { type: 'boot-failed'; error: SerializedError }
  | { type: 'log'; level: 'debug' | 'info' | 'warn'; msg: string; id?: number }
  | { type: 'progress'; id: number; progress: Progress }
  /**
   * The request's generations (or some of its images') left the queue in a batch holding
   * `batchSize` requests' generations, itself included (sent before any model runs; again for
   * each further batch of its images): the host's stall clock starts here.
   */
  | { type: 'started'; id: number; batchSize: number }
  | { type: 'done'; id: number; generation: Generation }
  | { type: 'failed'; id: number; error: SerializedError }
  | { type: 'closed' };
