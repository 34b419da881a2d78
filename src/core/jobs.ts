import { z } from 'zod';

/**
 * The job catalog shared by producer (API) and consumer (worker). A job carries only the row
 * id: the prompt and parameters live in Postgres, so Redis holds no user data.
 */

export const GENERATE_JOB = {
  name: 'generate',
  payload: z.strictObject({ imageId: z.uuid() }),
} as const;

export type GeneratePayload = z.infer<typeof GENERATE_JOB.payload>;

export interface QueueSettings {
  queueName: string;
  attempts: number;
  backoffMs: number;
  lockMs: number;
  stalledIntervalMs: number;
  /** Times a job may lose its worker (lock expired) before it fails. */
  maxStalls: number;
  keepCompleted: number;
  keepFailed: number;
}

/**
 * A model's name as requests, queues, metrics and job rows carry it: the folder name of its
 * export unless MODEL_NAME says otherwise. Letters, digits, '.', '_' and '-', starting with a
 * letter or digit; it becomes part of Redis keys and Prometheus labels, hence the short alphabet.
 */
export const MODEL_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isModelName(v: string): boolean {
  return MODEL_NAME_PATTERN.test(v);
}

/**
 * The queue of one model: QUEUE_NAME.MODEL. QUEUE_NAME has no '.', so the first one separates
 * the two and no two (deployment, model) pairs share a queue. Workers of a model consume only
 * its queue; the API puts each job on the queue of the model it names.
 */
export function queueNameFor(base: string, model: string): string {
  if (!isModelName(model)) throw new Error(`queueNameFor: "${model.slice(0, 80)}" is not a model name`);
  return `${base}.${model}`;
}
