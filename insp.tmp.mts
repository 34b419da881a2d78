import { inspectModel } from './src/engine/model-inspect.ts';
for (const d of process.argv.slice(2)) { const r = await inspectModel(d); console.log(JSON.stringify({ p: r.problems, v: r.variant, b: r.totalBytes, te: r.components.text_encoder?.inputs, u: r.components.unet?.inputs })); }
