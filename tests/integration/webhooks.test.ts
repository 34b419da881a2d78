/**
 * Webhooks end to end with real processes (`t2i api`, `t2i worker --test-engine`) on real
 * Postgres, Redis and S3, a receiver on loopback (opened by WEBHOOK_ALLOWED_HOSTS, as a private
 * deployment would), and a local DNS server the API resolves webhook hosts with.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import pg from 'pg';
import { Webhook } from 'standardwebhooks';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config.js';
import { freePort } from '../../src/dev/services.js';
import { configEnv, spawnService, testEngineArgs, type ServiceProcess } from '../support/processes.js';
import { TestDns } from '../support/dns.js';
import { checkedFetch, responseChecker, type ResponseChecker } from '../support/openapi.js';
import { createAccountsRepo } from '../../src/adapters/accounts-repo.js';
import { createPrismaClient } from '../../src/adapters/db/client.js';
import { AccountsService } from '../../src/core/accounts.js';
import { tenantSigningSecret } from '../../src/core/webhooks.js';
import { createTestKey, type TestKey } from '../support/accounts.js';
import { isolatedConfig } from '../support/system.js';

const SECRET = `whsec_${Buffer.from('a test secret of thirty-two bytes!').toString('base64')}`;

interface Received {
  headers: Record<string, string>;
  body: string;
  answered: number;
}

let config: Config;
let dns: TestDns;
let receiver: Server;
let receiverUrl = '';
const received: Received[] = [];
/** What the receiver answers to each request, by path; 200 when nothing is queued. */
const answers = new Map<string, number[]>();
const procs: ServiceProcess[] = [];
let api = '';
/** Every answer is checked against the API's OpenAPI document. */
let checker: ResponseChecker | undefined;
let tenant: TestKey;
const cfetch: typeof fetch = (input, init) =>
  checkedFetch(checker!)(input, { ...init, headers: { ...tenant.auth, ...(init?.headers as Record<string, string>) } });
/** The secret the tenant's receiver verifies with (what `t2i keys webhook-secret --tenant` prints). */
let tenantSecret = '';

beforeAll(async () => {
  dns = new TestDns();
  await dns.start();
  receiver = createServer((req: IncomingMessage, res: ServerResponse) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      const queued = answers.get(req.url ?? '');
      const status = queued?.shift() ?? 200;
      received.push({ headers: req.headers as Record<string, string>, body, answered: status });
      res.writeHead(status).end();
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  receiverUrl = `http://127.0.0.1:${(receiver.address() as { port: number }).port}`;
  config = await isolatedConfig({
    WEBHOOK_SECRET: SECRET,
    WEBHOOK_ALLOWED_HOSTS: '127.0.0.1',
    WEBHOOK_DNS_SERVERS: dns.server,
    WEBHOOK_BACKOFF_MS: '300',
    WEBHOOK_POLL_MS: '100',
    WEBHOOK_TIMEOUT_MS: '2000',
    LOG_LEVEL: 'info',
  });
  tenant = await createTestKey(config.DATABASE_URL, 'hooks-co');
  const db = new pg.Client({ connectionString: config.DATABASE_URL });
  await db.connect();
  const { rows } = await db.query<{ id: string }>('SELECT id FROM tenants WHERE name = $1', ['hooks-co']);
  await db.end();
  tenantSecret = tenantSigningSecret(SECRET, rows[0]!.id);
});

afterEach(async () => {
  await Promise.allSettled(procs.splice(0).map((p) => p.stop()));
});

afterAll(async () => {
  await new Promise((r) => receiver?.close(r));
  await dns?.stop();
});

async function startApi(): Promise<void> {
  const port = await freePort();
  const p = spawnService('api', 'api', configEnv(config, { PORT: String(port) }));
  procs.push(p);
  await p.waitForLine((l) => l.msg === 'api listening');
  api = `http://127.0.0.1:${port}`;
  checker ??= responseChecker(await (await fetch(`${api}/openapi.json`)).json());
}

async function startWorker(name = 'worker'): Promise<ServiceProcess> {
  const p = spawnService(name, 'worker', configEnv(config, { WORKER_ID: name }), testEngineArgs(10));
  procs.push(p);
  await p.waitForLine((l) => l.msg === 'worker ready');
  return p;
}

async function submit(body: Record<string, unknown>): Promise<Response> {
  return cfetch(`${api}/generated-images`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
}

interface DeliveryJson {
  id: string;
  event_type: string;
  status: string;
  attempts: Array<{ attempt: number; status_code: number | null; error: string | null; duration_ms: number }>;
}

async function deliveries(id: string): Promise<DeliveryJson[]> {
  const res = await cfetch(`${api}/generated-images/${id}/webhook-deliveries`);
  expect(res.status).toBe(200);
  return ((await res.json()) as { items: DeliveryJson[] }).items;
}

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('webhooks', () => {
  it('a receiver that fails three times, then succeeds, gets exactly one accepted delivery, signed', async () => {
    await Promise.all([startApi(), startWorker()]);
    const path = '/flaky';
    answers.set(path, [500, 503, 502]);
    const res = await submit({ prompt: 'a red circle', num_steps: 5, width: 64, height: 64, webhook_url: `${receiverUrl}${path}` });
    expect(res.status).toBe(201);
    const job = (await res.json()) as { id: string; webhook_url: string };
    expect(job.webhook_url).toBe(`${receiverUrl}${path}`);

    const done = await until('the delivery to succeed', async () => {
      const d = await deliveries(job.id);
      return d[0]?.status === 'succeeded' ? d : undefined;
    });
    const mine = received.filter((r) => r.body.includes(job.id));
    expect(mine.map((r) => r.answered)).toEqual([500, 503, 502, 200]);
    expect(mine.filter((r) => r.answered === 200)).toHaveLength(1);

    // Every attempt is the same message (id and body); each one verifies with the official package.
    expect(new Set(mine.map((r) => r.headers['webhook-id'])).size).toBe(1);
    expect(new Set(mine.map((r) => r.body)).size).toBe(1);
    const wh = new Webhook(tenantSecret);
    for (const r of mine) wh.verify(r.body, r.headers);
    // A wrong secret, the deployment's master secret or another tenant's secret, or an altered body, does not.
    expect(() => new Webhook(`whsec_${Buffer.from('another secret of thirty-two byte').toString('base64')}`).verify(mine[3]!.body, mine[3]!.headers)).toThrow();
    expect(() => new Webhook(SECRET).verify(mine[3]!.body, mine[3]!.headers)).toThrow();
    expect(() => new Webhook(tenantSigningSecret(SECRET, '00000000-0000-4000-8000-000000000000')).verify(mine[3]!.body, mine[3]!.headers)).toThrow();
    expect(() => wh.verify(mine[3]!.body.replace('succeeded', 'failed'), mine[3]!.headers)).toThrow();

    const payload = JSON.parse(mine[3]!.body) as { type: string; timestamp: string; data: { id: string; status: string; url: string } };
    expect(payload).toMatchObject({ type: 'image.succeeded', data: { id: job.id, status: 'succeeded' } });
    expect((await fetch(payload.data.url)).status).toBe(200);

    // The attempts are on the job.
    expect(done).toHaveLength(1);
    expect(done[0]!.attempts.map((a) => a.status_code)).toEqual([500, 503, 502, 200]);
    expect(done[0]!.attempts.map((a) => a.error)).toEqual(['the receiver answered 500', 'the receiver answered 503', 'the receiver answered 502', null]);
  });

  it('failed and canceled jobs are announced too', async () => {
    await Promise.all([startApi(), startWorker()]);
    const failing = (await (
      await submit({ prompt: 'boom [test:fail]', num_steps: 2, width: 64, height: 64, webhook_url: `${receiverUrl}/outcomes` })
    ).json()) as {
      id: string;
    };
    const canceled = (await (await submit({ prompt: 'slow', num_steps: 150, width: 64, height: 64, webhook_url: `${receiverUrl}/outcomes` })).json()) as {
      id: string;
    };
    await cfetch(`${api}/generated-images/${canceled.id}/cancel`, { method: 'POST' });
    const types = await until('both outcomes', async () => {
      const got = received.filter((r) => r.body.includes(failing.id) || r.body.includes(canceled.id)).map((r) => (JSON.parse(r.body) as { type: string }).type);
      return got.length >= 2 ? got.sort() : undefined;
    });
    expect(types).toEqual(['image.canceled', 'image.failed']);
    const failed = received.find((r) => r.body.includes(failing.id))!;
    expect(JSON.parse(failed.body)).toMatchObject({ data: { status: 'failed', error: { code: 'generation_failed' } } });
  });

  it('restarting the worker and the API between attempts loses no delivery', async () => {
    await startApi();
    const worker = await startWorker('w1');
    const path = '/after-restart';
    // Enough failures that the first worker is gone before the receiver accepts.
    answers.set(path, [500, 500]);
    const job = (await (await submit({ prompt: 'a blue square', num_steps: 3, width: 64, height: 64, webhook_url: `${receiverUrl}${path}` })).json()) as {
      id: string;
    };
    await until('a first failed attempt', async () => ((await deliveries(job.id))[0]?.attempts.length ?? 0) >= 1 || undefined);
    // Both processes die hard between attempts: nothing of the delivery lives in them.
    worker.kill('SIGKILL');
    procs[0]!.kill('SIGKILL');
    await Promise.all([worker.exited, procs[0]!.exited]);
    procs.splice(0);
    await Promise.all([startApi(), startWorker('w2')]);
    const done = await until('the delivery to succeed after the restart', async () => {
      const d = await deliveries(job.id);
      return d[0]?.status === 'succeeded' ? d[0] : undefined;
    });
    const mine = received.filter((r) => r.body.includes(job.id));
    expect(mine.filter((r) => r.answered === 200)).toHaveLength(1);
    expect(done.attempts.at(-1)!.status_code).toBe(200);
    expect(new Set(mine.map((r) => r.headers['webhook-id'])).size).toBe(1);
  });

  it("a key's default webhook is used when a job names none, and another tenant cannot read the deliveries", async () => {
    await Promise.all([startApi(), startWorker()]);
    const db = createPrismaClient(config.DATABASE_URL, { poolMax: 1 });
    const { key } = await new AccountsService(createAccountsRepo(db)).createKey('hooks-co', 'with a default', `${receiverUrl}/default-hook`);
    await db.$disconnect();
    const res = await fetch(`${api}/generated-images`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a blue circle', num_steps: 2, width: 64, height: 64 }),
    });
    const job = (await res.json()) as { id: string; webhook_url: string };
    expect(job.webhook_url).toBe(`${receiverUrl}/default-hook`);
    await until('the default webhook', async () => received.find((r) => r.body.includes(job.id)));
    new Webhook(tenantSecret).verify(received.find((r) => r.body.includes(job.id))!.body, received.find((r) => r.body.includes(job.id))!.headers);

    const other = await createTestKey(config.DATABASE_URL, 'someone-else');
    const foreign = await fetch(`${api}/generated-images/${job.id}/webhook-deliveries`, { headers: other.auth });
    expect(foreign.status).toBe(404);
  });

  it('refuses hostile webhook URLs at submission, including a host name that resolves to a private address', async () => {
    await startApi();
    dns.set('internal.example', '10.20.30.40');
    dns.set('v6.example', 'fd00::1');
    dns.set('meta.example', '169.254.169.254');
    const hostile = [
      'http://127.0.0.2/',
      'http://10.0.0.1/',
      'http://192.168.0.10/',
      'http://100.64.1.1/',
      'http://169.254.169.254/latest/meta-data/',
      'http://[::1]/',
      'http://[::ffff:10.0.0.1]/',
      'http://[fe80::1]/',
      'http://224.0.0.251/',
      'http://metadata.google.internal/',
      'http://internal.example/hook',
      'http://v6.example/hook',
      'http://meta.example/hook',
      'http://missing.example/hook',
      'ftp://example.com/',
      'http://user:pw@example.com/',
    ];
    for (const url of hostile) {
      const res = await submit({ prompt: 'x', webhook_url: url });
      expect(res.status, url).toBe(400);
      const body = (await res.json()) as { errors: Array<{ field: string; rule: string; message: string }> };
      expect(body.errors[0], url).toMatchObject({ field: 'webhook_url' });
      // The reason is public; no address the host resolved to is echoed.
      expect(JSON.stringify(body), url).not.toMatch(/10\.20\.30\.40|fd00::1/);
    }
    // The allowlisted receiver is accepted.
    expect((await submit({ prompt: 'x', webhook_url: `${receiverUrl}/ok` })).status).toBe(201);
  });
});

describe('the OpenAPI document', () => {
  it('documents every answer these tests received', () => {
    checker!.expectNoMismatch();
    expect([...checker!.seen.keys()]).toEqual(expect.arrayContaining(['GET /generated-images/{id}/webhook-deliveries 200', 'POST /generated-images 400']));
  });
});
