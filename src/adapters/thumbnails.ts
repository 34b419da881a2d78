import sharp from 'sharp';

/**
 * Small previews of stored images for the web page's gallery: a 512 x 512 PNG of a few hundred
 * kilobytes becomes a WebP of a few kilobytes, so a page of a dozen jobs stays light. The API's
 * only use of sharp (the engine has its own, in its thread).
 */

/** Longer side of a thumbnail, in pixels: twice the gallery's CSS size, for high-density screens. */
export const THUMBNAIL_SIDE = 256;

export async function webpThumbnail(png: Buffer, side = THUMBNAIL_SIDE): Promise<Buffer> {
  // `inside` keeps the aspect ratio; withoutEnlargement leaves a 64 x 64 image as it is.
  return sharp(png).resize(side, side, { fit: 'inside', withoutEnlargement: true }).webp({ quality: 80 }).toBuffer();
}
