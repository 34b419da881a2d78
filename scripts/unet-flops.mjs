// Counts the multiply-accumulates (MACs), weights and activation traffic of one forward pass of
// Stable Diffusion 1.5's and SDXL's UNets and of their VAE decoder, per image row, from the
// published diffusers configs (UNet2DConditionModel, AutoencoderKL). docs/performance.md quotes
// its output. `node scripts/unet-flops.mjs`
//
// Counted: convolutions (Cin x Cout x k^2 per output pixel), linear layers (in x out per token),
// and attention's two matrix products (QK^T and AV: n x m x C each). Norms, activations and
// elementwise adds cost no MACs worth counting; they appear in the activation traffic, which
// assumes the fused kernels onnxruntime's CUDA optimizer and TensorRT use (GroupNorm with SiLU,
// LayerNorm with the residual, flash attention that never writes the n x n scores).

const conv = (cin, cout, k, pixels) => cin * cout * k * k * pixels;

function counter() {
  const blocks = new Map();
  const t = { macs: 0, weights: 0, activations: 0, attentionProducts: 0 };
  const add = (block, macs, weights, activations, attentionProducts = 0) => {
    blocks.set(block, (blocks.get(block) ?? 0) + macs);
    t.macs += macs;
    t.weights += weights;
    t.activations += activations;
    t.attentionProducts += attentionProducts;
  };
  return { blocks, t, add };
}

/** ResnetBlock2D: GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv, 1x1 shortcut when the width changes. */
function resnet(c, block, cin, cout, px) {
  const shortcut = cin !== cout;
  c.add(
    `${block} resnets`,
    conv(cin, cout, 3, px) + conv(cout, cout, 3, px) + (shortcut ? conv(cin, cout, 1, px) : 0),
    9 * cin * cout + 9 * cout * cout + (shortcut ? cin * cout : 0),
    // norm+SiLU (read, write), conv1 (read, write), norm+SiLU, conv2 with the residual (2 reads, write), shortcut
    px * (2 * cin + cin + cout + 2 * cout + 3 * cout + (shortcut ? cin + cout : 0)),
  );
}

/** Transformer2DModel: proj_in, `depth` blocks of self-attention, cross-attention over 77 text tokens and a GEGLU feed-forward, proj_out. */
function transformer(c, block, ch, n, depth, textWidth) {
  const m = 77;
  const perBlock =
    4 * n * ch * ch +
    2 * n * n * ch + // self-attention: q, k, v, out; QK^T and AV
    2 * n * ch * ch +
    2 * m * textWidth * ch +
    2 * n * m * ch + // cross-attention: q, out; k, v of the text; QK^T and AV
    n * ch * 8 * ch +
    n * 4 * ch * ch; // GEGLU: ch -> 2 x 4ch, then 4ch -> ch
  c.add(
    `${block} transformers`,
    2 * n * ch * ch + depth * perBlock,
    2 * ch * ch + depth * (6 * ch * ch + 2 * textWidth * ch + 12 * ch * ch),
    // tensors of n x ch read or written per block (the FF's 4ch and 8ch wide ones counted as 4 and 8)
    n * ch * (4 + depth * 52),
    depth * (2 * n * n * ch + 2 * n * m * ch),
  );
}

function unet({ widths, depths, side, textWidth, downsample }) {
  const c = counter();
  let s = side;
  c.add('conv_in, conv_out', conv(4, widths[0], 3, s * s) + conv(widths[0], 4, 3, s * s), 9 * 4 * widths[0] * 2, s * s * (8 + 2 * widths[0]));
  const skips = [widths[0]];
  let w = widths[0];
  widths.forEach((out, level) => {
    for (let j = 0; j < 2; j++) {
      resnet(c, `down ${level}`, w, out, s * s);
      w = out;
      if (depths[level]) transformer(c, `down ${level}`, w, s * s, depths[level], textWidth);
      skips.push(w);
    }
    if (downsample[level]) {
      s /= 2;
      c.add(`down ${level} downsample`, conv(w, w, 3, s * s), 9 * w * w, 5 * w * s * s);
      skips.push(w);
    }
  });
  const last = widths.length - 1;
  resnet(c, 'mid', w, w, s * s);
  transformer(c, 'mid', w, s * s, depths[last] || 1, textWidth);
  resnet(c, 'mid', w, w, s * s);
  for (let level = last; level >= 0; level--) {
    const out = widths[level];
    for (let j = 0; j < 3; j++) {
      resnet(c, `up ${level}`, w + skips.pop(), out, s * s);
      w = out;
      if (depths[level]) transformer(c, `up ${level}`, w, s * s, depths[level], textWidth);
    }
    if (level > 0 && downsample[level - 1]) {
      s *= 2;
      c.add(`up ${level} upsample`, conv(w, w, 3, s * s), 9 * w * w, 5 * w * s * s);
    }
  }
  return c;
}

function vaeDecoder(latentSide) {
  const c = counter();
  let s = latentSide;
  c.add('conv_in, conv_out', conv(4, 512, 3, s * s) + conv(128, 3, 3, (8 * s) ** 2), 9 * (4 * 512 + 128 * 3), (8 * s) ** 2 * 131);
  resnet(c, 'mid', 512, 512, s * s);
  c.add('mid attention', 4 * s * s * 512 * 512 + 2 * (s * s) ** 2 * 512, 4 * 512 * 512, 8 * s * s * 512, 2 * (s * s) ** 2 * 512);
  resnet(c, 'mid', 512, 512, s * s);
  let w = 512;
  [512, 512, 256, 128].forEach((out, i) => {
    for (let j = 0; j < 3; j++) {
      resnet(c, `up ${i}`, w, out, s * s);
      w = out;
    }
    if (i < 3) {
      s *= 2;
      c.add(`up ${i} upsample`, conv(w, w, 3, s * s), 9 * w * w, 5 * w * s * s);
    }
  });
  return c;
}

const G = (x) => (x / 1e9).toFixed(1);
const models = [
  // runwayml/stable-diffusion-v1-5 unet/config.json: block_out_channels [320, 640, 1280, 1280], three CrossAttnDownBlock2D
  // and a DownBlock2D, one transformer layer each, cross_attention_dim 768, sample_size 64 (512x512).
  ['SD 1.5 UNet, 512x512', unet({ widths: [320, 640, 1280, 1280], depths: [1, 1, 1, 0], side: 64, textWidth: 768, downsample: [true, true, true, false] })],
  // stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: [320, 640, 1280], DownBlock2D then two CrossAttnDownBlock2D,
  // transformer_layers_per_block [1, 2, 10] (the first level has no attention), cross_attention_dim 2048, sample_size 128.
  ['SDXL UNet, 1024x1024', unet({ widths: [320, 640, 1280], depths: [0, 2, 10], side: 128, textWidth: 2048, downsample: [true, true, false] })],
  ['VAE decoder, 512x512', vaeDecoder(64)],
  ['VAE decoder, 1024x1024', vaeDecoder(128)],
];
for (const [name, { blocks, t }] of models) {
  const kinds = { resnets: 0, 'transformers and attention': 0, 'down/upsampling, in/out': 0 };
  for (const [block, macs] of blocks) {
    const kind = block.endsWith('resnets') ? 'resnets' : /transformers|attention/.test(block) ? 'transformers and attention' : 'down/upsampling, in/out';
    kinds[kind] += macs;
  }
  console.log(`\n${name}: ${G(t.macs)} GMAC = ${G(2 * t.macs)} GFLOP per image row`);
  console.log(
    `  ${Object.entries(kinds)
      .map(([k, v]) => `${k} ${G(v)}`)
      .join(', ')} GMAC`,
  );
  console.log(`  without attention's two matrix products: ${G(t.macs - t.attentionProducts)} GMAC`);
  console.log(`  ${(t.weights / 1e6).toFixed(0)} M weights counted; ${G(2 * t.activations)} GB of fp16 activations read and written`);
  for (const [block, macs] of blocks) console.log(`    ${block.padEnd(20)} ${G(macs).padStart(8)} GMAC`);
}
