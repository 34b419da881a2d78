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
