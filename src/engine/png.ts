import { crc32 } from 'node:zlib';
import sharp from 'sharp';

/**
 * PNG encoding with the generation parameters carried inside the file. sharp encodes the
 * pixels; the parameters go in iTXt chunks (UTF-8, so prompts in any script survive) inserted
 * right after IHDR, where readers such as exiftool and A1111-style tools look for them.
 */

export async function encodePng(rgb: Uint8Array, width: number, height: number, text: Record<string, string>): Promise<Buffer> {
  const png = await sharp(rgb, { raw: { width, height, channels: 3 } })
    .png({ compressionLevel: 6 })
    .toBuffer();
  return withTextChunks(png, text);
}

const SIGNATURE_LENGTH = 8;

export function withTextChunks(png: Buffer, text: Record<string, string>): Buffer {
  // IHDR is always the first chunk: 4 length + 4 type + 13 data + 4 CRC bytes.
  const ihdrEnd = SIGNATURE_LENGTH + 4 + 4 + 13 + 4;
  if (png.subarray(12, 16).toString('latin1') !== 'IHDR') throw new Error('not a PNG: IHDR is not the first chunk');
  const chunks = Object.entries(text).map(([k, v]) => chunk('iTXt', itxtData(k, v)));
  return Buffer.concat([png.subarray(0, ihdrEnd), ...chunks, png.subarray(ihdrEnd)]);
}

function itxtData(keyword: string, value: string): Buffer {
  if (!/^[\x20-\x7e]{1,79}$/.test(keyword)) throw new Error(`PNG text keyword "${keyword}" must be 1-79 printable Latin-1 characters`);
  // keyword NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL, UTF-8 text
  return Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0, 0, 0, 0, 0]), Buffer.from(value, 'utf8')]);
}

function chunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])) >>> 0, 0);
  return Buffer.concat([head, data, crc]);
}

/** Reads every tEXt and uncompressed iTXt chunk back (for tests and `t2i` users). */
export function readPngText(png: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let at = SIGNATURE_LENGTH;
  while (at + 8 <= png.length) {
    const length = png.readUInt32BE(at);
    const type = png.subarray(at + 4, at + 8).toString('latin1');
    const data = png.subarray(at + 8, at + 8 + length);
    if (type === 'tEXt') {
      const nul = data.indexOf(0);
      out[data.subarray(0, nul).toString('latin1')] = data.subarray(nul + 1).toString('latin1');
    } else if (type === 'iTXt') {
      const nul = data.indexOf(0);
      const keyword = data.subarray(0, nul).toString('latin1');
      if (data[nul + 1] === 0) {
        const lang = data.indexOf(0, nul + 3);
        const translated = data.indexOf(0, lang + 1);
        out[keyword] = data.subarray(translated + 1).toString('utf8');
      }
    }
    if (type === 'IEND') break;
    at += 12 + length;
  }
  return out;
}

/** Longer side of a live preview, in pixels. */
export const PREVIEW_MAX_SIDE = 128;

/**
 * A latent preview (RGB at 1/8 scale, see preview.ts) as a small WebP for live streams: scaled
 * so its longer side is PREVIEW_MAX_SIDE (a 512x512 generation's 64x64 latents become 128x128),
 * lossy, a few kilobytes.
 */
export async function encodePreviewWebp(rgb: Uint8Array, width: number, height: number): Promise<{ data: Buffer; width: number; height: number }> {
  const scale = PREVIEW_MAX_SIDE / Math.max(width, height);
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  const data = await sharp(rgb, { raw: { width, height, channels: 3 } })
    .resize(w, h, { kernel: 'cubic' })
    .webp({ quality: 70 })
    .toBuffer();
  return { data, width: w, height: h };
}
