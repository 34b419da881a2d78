/**
 * Why a job failed, as clients see it: a stable code and a public message. The code and message
 * are stored on the job row and returned by the API; the internal detail (storage host and
 * port, variable names, model file paths, stack text) goes to logs and Sentry only.
 *
 * README "Failure codes" documents each code; keep the two in step.
 */

export const FAILURE_CODES = [
  /** The parameters cannot work with the worker's model (the message says which and why). Not retried. */
  'invalid_for_model',
  /** The model failed while generating. Retried. */
  'generation_failed',
  /** The worker ran out of memory for this request. Not retried: the same request would again. */
  'out_of_memory',
  /** An attempt ran past JOB_TIMEOUT_MS. Retried. */
  'timed_out',
  /** The image was made but could not be stored. Retried. */
  'storage_unavailable',
  /** The generation took the engine down (thread crash or hang) more than once. Not retried again. */
  'engine_crashed',
  /** The workers running the job stopped responding too many times. */
  'worker_lost',
  /** Anything else. */
  'internal',
] as const;

export type FailureCode = (typeof FAILURE_CODES)[number];

export interface Failure {
  code: FailureCode;
  /** Public: safe to show any client. */
  message: string;
}

const MESSAGES: Record<FailureCode, string> = {
  invalid_for_model: "The request's parameters cannot be used with this model.",
  generation_failed: 'The model failed while generating the image.',
  out_of_memory: 'The worker ran out of memory generating this image; try a smaller size or fewer steps.',
  timed_out: 'The job took longer than its time limit.',
  storage_unavailable: 'The image was generated but could not be stored.',
  engine_crashed: 'The generation stopped the model engine repeatedly, so it was not tried again.',
  worker_lost: 'The workers running the job stopped responding too many times.',
  internal: 'The job failed because of an internal error.',
};

/**
 * The failure for a code. `detail` is appended only where it is public by contract: the engine's
 * InvalidParamsError messages name a parameter and its allowed values, never a path or host.
 */
export function failure(code: FailureCode, detail?: string): Failure {
  if (code === 'invalid_for_model' && detail) return { code, message: `${MESSAGES[code]} ${detail}` };
  if (code === 'timed_out' && detail) return { code, message: `The job took longer than its time limit of ${detail}.` };
  return { code, message: MESSAGES[code] };
}

export function isFailureCode(v: unknown): v is FailureCode {
  return typeof v === 'string' && (FAILURE_CODES as readonly string[]).includes(v);
}

/**
 * The failure a queue's failed-job reason stands for. The worker fails queue jobs with
 * "<code>: <public message>"; any other reason is the queue's own (it gave up on a job whose
 * workers kept stalling), which is worker_lost.
 */
export function failureFromQueueReason(reason: string | undefined): Failure {
  const m = /^([a-z_]+): (.+)$/s.exec(reason ?? '');
  if (m && isFailureCode(m[1]) && m[2]) return { code: m[1], message: m[2] };
  return failure('worker_lost');
}
