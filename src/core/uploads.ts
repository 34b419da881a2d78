import { decodeImage } from '../engine/input-images.js';
import { ValidationError } from './errors.js';
import type { InputPicture } from './submission.js';

/**
 * Input pictures as the API receives them (multipart POST /generated-images): a PNG, JPEG or
 * WebP file, recognised by its first bytes (not by the name or type the client gave it), then
 * decoded whole, as the worker's engine will decode it (EXIF orientation applied, at most
 * 2048x2048 pixels). So a truncated, corrupt or oversized file is a 400 naming its field now,
 * not a failed job later, and the size checked against the request is the size the engine sees.
 */

const FORMATS: Array<{ contentType: string; matches(b: Buffer): boolean }> = [
  { contentType: 'image/png', matches: (b) => b.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) },
  { contentType: 'image/jpeg', matches: (b) => b.length > 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff },
  { contentType: 'image/webp', matches: (b) => b.subarray(0, 4).toString('latin1') === 'RIFF' && b.subarray(8, 12).toString('latin1') === 'WEBP' },
];

/** Checks an uploaded file and returns it with its type and (oriented) size; a ValidationError naming `field` otherwise. */
export async function probePicture(bytes: Buffer, field: 'image' | 'mask'): Promise<InputPicture> {
  const format = FORMATS.find((f) => f.matches(bytes));
  if (!format) {
    throw new ValidationError([{ field, rule: 'format', message: 'must be a PNG, JPEG or WebP file (its first bytes are not one of these)' }]);
  }
  try {
    const { width, height } = await decodeImage(bytes, field);
    return { bytes, contentType: format.contentType, width, height };
  } catch (err) {
    if ((err as Error).name !== 'InvalidParamsError') throw err;
    // The decoder's own words (libvips') stay in the log; the client learns what to fix.
    throw new ValidationError([
      { field, rule: 'decode', message: `is not a ${format.contentType.slice(6).toUpperCase()} file that can be read, or is larger than 2048x2048 pixels` },
    ]);
  }
}
