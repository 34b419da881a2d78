import { startServices } from './src/dev/services.js';
import { createStorage } from './src/adapters/storage.js';
import sharp from 'sharp';
const services = await startServices({ only: ['s3'] });
const storage = createStorage({ endpoint: services.s3.endpoint, accessKey: services.s3.accessKey, secretKey: services.s3.secretKey, bucket: 'lat', region: services.s3.region, presignTtlSeconds: 3600 });
await storage.ensureBucket();
const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 1, g: 2, b: 3 } } }).png().toBuffer();
const t: number[] = [];
for (let i = 0; i < 200; i++) { const s = performance.now(); await storage.putPng(`images/x${i}/1.png`, png); t.push(performance.now() - s); }
t.sort((a, b) => a - b);
console.log('put p50', t[100]!.toFixed(1), 'p90', t[180]!.toFixed(1), 'p99', t[198]!.toFixed(1));
await services.stop();
