import { spawn } from 'node:child_process';
import autocannon from 'autocannon';
import { applyMigrations } from './src/adapters/db/migrate.js';
import { freePort, servicesEnv, startServices } from './src/dev/services.js';
import { createTestKey } from './tests/support/accounts.js';

const services = await startServices();
await applyMigrations(services.postgres.url);
const key = await createTestKey(services.postgres.url, 'prof');
const port = await freePort();
const env = { ...process.env, ...servicesEnv(services, 'prof'), PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'info', RATE_LIMIT_MAX: '0', MAX_QUEUE_DEPTH: '0', TENANT_MAX_IN_FLIGHT: '0', TENANT_DAILY_PIXEL_STEPS: '0' };
const api = spawn(process.execPath, ['--cpu-prof', '--cpu-prof-dir=/tmp/prof', 'bin/t2i.js', 'api'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
for (;;) { try { if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) break; } catch {} await new Promise((r) => setTimeout(r, 200)); }
const body = JSON.stringify({ prompt: 'a red circle', num_steps: 1, width: 64, height: 64, seed: 1, scheduler: 'euler' });
const res = await autocannon({ url: `http://127.0.0.1:${port}/generated-images`, method: 'POST', headers: { 'content-type': 'application/json', authorization: key.auth.authorization }, body, connections: 10, duration: 10 });
console.log('req/s', res.requests.average, 'p99', res.latency.p99, 'non2xx', res.non2xx);
api.kill('SIGINT');
await new Promise((r) => api.once('exit', r));
await services.stop();
