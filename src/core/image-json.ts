import type { ImageRecord } from './images.js';

/**
 * A job as clients see it, in the textbook's snake_case: the API's answers, the webhooks' `data`
 * and the OpenAI route all show the same fields.
 */
export function imageJson(r: ImageRecord) {
  return {
    id: r.id,
    status: r.status,
    progress: r.progress,
    prompt: r.prompt,
    negative_prompt: r.negativePrompt,
    model: r.model,
    num_steps: r.numSteps,
    guidance_scale: r.guidanceScale,
    seed: r.seed,
    width: r.width,
    height: r.height,
    scheduler: r.scheduler,
    strength: r.strength,
    inputs: { image: r.imageKey !== null, mask: r.maskKey !== null },
    file_name: r.fileName,
    // Why the job failed (or why its last attempt did): a stable code and a public message.
    error: r.errorCode ? { code: r.errorCode, message: r.error ?? '' } : null,
    attempts: r.attempts,
    // What the job counts against the daily budget (width x height x num_steps).
    pixel_steps: r.pixelSteps,
    num_images: r.numImages,
    webhook_url: r.webhookUrl,
    cancel_requested_at: r.cancelRequestedAt?.toISOString() ?? null,
    created_at: r.createdAt.toISOString(),
    started_at: r.startedAt?.toISOString() ?? null,
    finished_at: r.finishedAt?.toISOString() ?? null,
  };
}
