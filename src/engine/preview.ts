/**
 * A cheap look at the latents while they denoise: Stable Diffusion 1.x's four latent channels
 * are close to a linear function of RGB, so a 4x3 matrix (the factors A1111 and ComfyUI use
 * for their live previews) gives a recognisable 1/8-scale picture at no model cost.
 */

export interface Preview {
  width: number;
  height: number;
  /** HWC RGB bytes at latent resolution. */
  rgb: Uint8Array;
}

const SD1_LATENT_RGB: ReadonlyArray<readonly [number, number, number]> = [
  [0.3512, 0.2297, 0.3227],
  [0.325, 0.4974, 0.235],
  [-0.2829, 0.1762, 0.2721],
  [-0.212, -0.2616, -0.7177],
];

export function latentPreview(latents: Float32Array, h: number, w: number): Preview {
  const plane = h * w;
  const rgb = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      let v = 0;
      for (let k = 0; k < 4; k++) v += latents[k * plane + i]! * SD1_LATENT_RGB[k]![c]!;
      rgb[i * 3 + c] = Math.round(Math.min(1, Math.max(0, (v + 1) / 2)) * 255);
    }
  }
  return { width: w, height: h, rgb };
}
