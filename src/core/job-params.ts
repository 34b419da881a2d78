import { GENERATION_DEFAULTS, GENERATION_LIMITS } from '../engine/pipeline.js';
import { ValidationError, type FieldError } from './errors.js';
import type { ModelProfile } from './fleet.js';
import type { CreateImageBody } from './params.js';

/**
 * A request's parameters as its job will run them: what the request leaves out is the model's
 * own default (steps, guidance, size, scheduler, strength as its workers announced them), the
 * size of an input picture is the output's size, and the request is checked against what the
 * model can do (an input picture needs a VAE encoder, a mask an inpainting path).
 *
 * A model that is known but was never served has no announced defaults: what the request leaves
 * out stays null in the row and its first worker fills it in when it claims the job
 * (ImagesRepo.startAttempt). Until then the job is charged as if those were 512x512 and 50 steps
 * (GENERATION_DEFAULTS), and the worker corrects the charge.
 */

/** An uploaded picture as the API decoded it (EXIF orientation applied). */
export interface PictureSize {
  width: number;
  height: number;
}

export interface JobParams {
  numSteps: number | null;
  guidanceScale: number | null;
  width: number | null;
  height: number | null;
  scheduler: string | null;
  strength: number | null;
  /** width x height x num_steps, with GENERATION_DEFAULTS for what is still unknown. */
  cost: number;
}

/** The compute of a job in pixel-steps (a 512x512 image at 50 steps is 13,107,200), with GENERATION_DEFAULTS for what is not known yet. */
export function pixelStepsOf(p: { width: number | null; height: number | null; numSteps: number | null }): number {
  return (p.width ?? GENERATION_DEFAULTS.width) * (p.height ?? GENERATION_DEFAULTS.height) * (p.numSteps ?? GENERATION_DEFAULTS.numSteps);
}

const { minSide, maxSide } = GENERATION_LIMITS;

/** Fills in the model's defaults and checks the request against its model and input pictures; throws a ValidationError listing every problem. */
export function jobParams(
  body: CreateImageBody,
  model: { id: string; profile: ModelProfile | null },
  inputs: { image?: PictureSize; mask?: PictureSize },
): JobParams {
  const errors: FieldError[] = [];
  const { image, mask } = inputs;
  const named = `model "${model.id}"${model.profile?.variant ? ` (${model.profile.variant})` : ''}`;

  if (mask && !image) errors.push({ field: 'mask', rule: 'requires_image', message: 'needs the picture to inpaint: send it as `image` too' });
  if (body.strength !== null && !image)
    errors.push({ field: 'strength', rule: 'requires_image', message: 'applies to image-to-image: send an `image` too, or leave strength out' });
  if (image && body.num_images > 1)
    errors.push({ field: 'num_images', rule: 'max', message: 'must be 1 with an input image (image-to-image and inpainting make one image)' });
  if (image) {
    const { width: w, height: h } = image;
    if (w % 8 !== 0 || h % 8 !== 0 || Math.min(w, h) < minSide || Math.max(w, h) > maxSide) {
      errors.push({ field: 'image', rule: 'dimensions', message: `is ${w}x${h} pixels; its sides must be multiples of 8 from ${minSide} to ${maxSide}` });
    }
    const asked = [body.width === undefined ? null : `width ${body.width}`, body.height === undefined ? null : `height ${body.height}`].filter(Boolean);
    if ((body.width !== undefined && body.width !== w) || (body.height !== undefined && body.height !== h)) {
      errors.push({
        field: 'image',
        rule: 'size',
        message: `is ${w}x${h} pixels but the request asks for ${asked.join(' and ')}; they must match (or leave width and height out)`,
      });
    }
    if (mask && (mask.width !== w || mask.height !== h)) {
      errors.push({ field: 'mask', rule: 'size', message: `is ${mask.width}x${mask.height} pixels but the image is ${w}x${h}; they must match` });
    }
  }

  const tasks = model.profile?.tasks;
  if (tasks) {
    if (!image && !tasks.includes('text-to-image')) {
      errors.push({ field: 'image', rule: 'required', message: `${named} is an inpainting model: it needs an image and a mask` });
    } else if (image && !mask && !tasks.includes('image-to-image')) {
      errors.push(
        tasks.includes('inpainting')
          ? { field: 'mask', rule: 'required', message: `${named} is an inpainting model: send a mask with the image` }
          : { field: 'image', rule: 'not_supported', message: `${named} cannot take an input picture (its export has no VAE encoder)` },
      );
    }
    if (mask && image && !tasks.includes('inpainting')) errors.push({ field: 'mask', rule: 'not_supported', message: `${named} does no inpainting` });
    if (body.strength !== null && image && !tasks.includes('image-to-image')) {
      errors.push({
        field: 'strength',
        rule: 'not_supported',
        message: `${named} is a 9-channel inpainting model, which always starts from noise; leave strength out`,
      });
    }
    if (body.scheduler !== undefined && !model.profile!.schedulers.includes(body.scheduler)) {
      errors.push({ field: 'scheduler', rule: 'not_supported', message: `${named} takes ${model.profile!.schedulers.join(', ')}` });
    }
  }
  if (errors.length > 0) throw new ValidationError(errors);

  const d = model.profile?.defaults;
  const p = {
    numSteps: body.num_steps ?? d?.num_steps ?? null,
    guidanceScale: body.guidance_scale ?? d?.guidance_scale ?? null,
    width: body.width ?? image?.width ?? d?.width ?? null,
    height: body.height ?? image?.height ?? d?.height ?? null,
    scheduler: body.scheduler ?? d?.scheduler ?? null,
    // The model's strength applies where it takes one (not on a 9-channel inpainting UNet).
    strength: body.strength ?? (image && (!tasks || tasks.includes('image-to-image')) ? (d?.strength ?? null) : null),
  };
  return { ...p, cost: pixelStepsOf(p) };
}
