/**
 * The webhook HTTP client against real sockets and a real (tiny, local) DNS server: the SSRF
 * matrix is refused before any connection, a host is resolved once and the connection goes to
 * the address that was checked (DNS rebinding cannot switch it), redirects are not followed, and
 * slow or oversized answers are cut off.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createWebhookClient, dnsServersLookup, WebhookSendError, type WebhookClient } from '../../src/adapters/webhook-http.js';
import { HostAllowlist, WebhookUrlError } from '../../src/core/ssrf.js';
import { TestDns } from '../support/dns.js';

let dns: TestDns;
let receiver: Server;
let port = 0;
const hits: Array<{ url: string; host: string | undefined; body: string }> = [];
let handler: (req: IncomingMessage, res: ServerResponse) => void = (_req, res) => res.end('ok');

beforeAll(async () => {
  dns = new TestDns();
  await dns.start();
  receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      hits.push({ url: req.url ?? '', host: req.headers.host, body });
      handler(req, res);
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  port = (receiver.address() as { port: number }).port;
});

afterAll(async () => {
  await dns?.stop();
  await new Promise((r) => receiver?.close(r));
});

function client(allow: string[] = [], timeoutMs = 2_000): WebhookClient {
  return createWebhookClient({
    allow: new HostAllowlist(allow),
    lookup: dnsServersLookup([dns.server], 1_000),
    timeoutMs,
    maxResponseBytes: 1024,
    userAgent: 't2i-test',
  });
}

const HOSTILE: Array<[string, string]> = [
  ['http://127.0.0.1/hook', 'blocked_address'],
  ['http://127.1.2.3:8080/hook', 'blocked_address'],
  ['http://2130706433/', 'blocked_address'], // 127.0.0.1 in decimal
  ['http://0x7f000001/', 'blocked_address'], // and in hex
  ['http://0.0.0.0/', 'blocked_address'],
  ['http://10.0.0.1/', 'blocked_address'],
  ['http://172.16.5.4/', 'blocked_address'],
  ['http://192.168.1.1/', 'blocked_address'],
  ['http://100.64.0.1/', 'blocked_address'], // CGNAT
  ['http://100.100.100.200/latest/meta-data', 'blocked_address'], // Alibaba metadata (CGNAT)
  ['http://169.254.169.254/latest/meta-data/', 'blocked_address'], // AWS, GCP, Azure metadata
  ['http://224.0.0.1/', 'blocked_address'], // multicast
  ['http://255.255.255.255/', 'blocked_address'],
  ['http://[::1]/', 'blocked_address'],
  ['http://[::]/', 'blocked_address'],
  ['http://[::ffff:127.0.0.1]/', 'blocked_address'], // IPv4-mapped loopback
  ['http://[::ffff:a9fe:a9fe]/', 'blocked_address'], // IPv4-mapped 169.254.169.254
  ['http://[64:ff9b::a00:1]/', 'blocked_address'], // NAT64 of 10.0.0.1
  ['http://[2002:7f00:1::]/', 'blocked_address'], // 6to4 of 127.0.0.1
  ['http://[fe80::1]/', 'blocked_address'],
  ['http://[fd00:ec2::254]/', 'blocked_address'], // AWS metadata over IPv6
  ['http://[ff02::1]/', 'blocked_address'],
  ['http://metadata.google.internal/computeMetadata/v1/', 'blocked_host'],
  ['http://internal.test/hook', 'blocked_address'], // A 10.1.2.3
  ['http://loopback.test/hook', 'blocked_address'], // A 127.0.0.1
  ['http://v6internal.test/hook', 'blocked_address'], // AAAA fd12::1
  ['http://mixed.test/hook', 'blocked_address'], // one public and one private A
  ['http://metadata.test/hook', 'blocked_address'], // A 169.254.169.254
  ['http://nowhere.test/hook', 'unresolvable'],
  ['ftp://example.com/hook', 'scheme'],
  ['file:///etc/passwd', 'scheme'],
  ['gopher://127.0.0.1:6379/_FLUSHALL', 'scheme'],
  ['http://user:secret@example.com/hook', 'credentials'],
  ['not a url', 'url'],
];

describe('webhook client', () => {
  beforeAll(() => {
    dns.set('internal.test', '10.1.2.3');
    dns.set('loopback.test', '127.0.0.1');
    dns.set('v6internal.test', 'fd12::1');
    dns.set('mixed.test', '93.184.216.34', '127.0.0.1');
    dns.set('metadata.test', '169.254.169.254');
    dns.set('receiver.test', '127.0.0.1');
  });

  it('refuses every hostile URL before connecting, with the rule that refused it', async () => {
    const c = client();
    const before = hits.length;
    for (const [url, rule] of HOSTILE) {
      const err = await c.check(url).catch((e: unknown) => e);
      expect(err, url).toBeInstanceOf(WebhookUrlError);
      expect((err as WebhookUrlError).rule, url).toBe(rule);
      const sent = await c.post(url, '{}', {}).catch((e: unknown) => e);
      expect(sent, url).toBeInstanceOf(WebhookSendError);
      expect((sent as WebhookSendError).message, url).toMatch(/^refused/);
      expect((sent as WebhookSendError).permanent, url).toBe(rule !== 'unresolvable');
    }
    expect(hits.length, 'no request reached the receiver').toBe(before);
  });

  it('reaches an allowlisted host by name or by range, sending the Host of the URL', async () => {
    await client(['receiver.test']).post(`http://receiver.test:${port}/by-name`, '{"a":1}', { 'content-type': 'application/json' });
    await client(['127.0.0.0/8']).post(`http://receiver.test:${port}/by-range`, '{"a":2}', {});
    expect(hits.slice(-2).map((h) => [h.url, h.host, h.body])).toEqual([
      ['/by-name', `receiver.test:${port}`, '{"a":1}'],
      ['/by-range', `receiver.test:${port}`, '{"a":2}'],
    ]);
  });

  it('connects to the address it checked: a host is looked up once, so rebinding cannot switch it', async () => {
    // Allowed by range: the answer at check time is 127.0.0.1; the moment after, it would be metadata.
    dns.set('flip.test', '127.0.0.1');
    const asked = dns.asked.length;
    const c = client(['127.0.0.1/32']);
    handler = (_req, res) => {
      res.end('ok');
    };
    const lookups: string[] = [];
    const counting = createWebhookClient({
      allow: new HostAllowlist(['127.0.0.1/32']),
      lookup: async (host) => {
        lookups.push(host);
        const answer = await dnsServersLookup([dns.server])(host);
        dns.set('flip.test', '169.254.169.254');
        return answer;
      },
      timeoutMs: 2_000,
      maxResponseBytes: 1024,
      userAgent: 't2i-test',
    });
    await counting.post(`http://flip.test:${port}/rebind`, '{}', {});
    expect(lookups).toEqual(['flip.test']);
    expect(hits.at(-1)!.url).toBe('/rebind');
    // And the next send looks again, sees the new answer, and refuses.
    const err = await c.post(`http://flip.test:${port}/rebind`, '{}', {}).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/refused: the URL has a host name that resolves to a link-local address/);
    expect(dns.asked.length).toBeGreaterThan(asked);
  });

  it('does not follow redirects, cuts off slow and oversized answers', async () => {
    const c = client(['127.0.0.1'], 500);
    handler = (req, res) => {
      if (req.url === '/redirect') {
        res.writeHead(302, { location: `http://127.0.0.1:${port}/redirected` }).end();
      } else if (req.url === '/slow') {
        setTimeout(() => res.end('late'), 2_000);
      } else if (req.url === '/big') {
        res.end('x'.repeat(10_000));
      } else {
        res.end('ok');
      }
    };
    expect(await c.post(`http://127.0.0.1:${port}/redirect`, '{}', {})).toEqual({ status: 302 });
    expect(hits.some((h) => h.url === '/redirected')).toBe(false);

    const started = performance.now();
    await expect(c.post(`http://127.0.0.1:${port}/slow`, '{}', {})).rejects.toThrow(/no answer within 500 ms/);
    expect(performance.now() - started).toBeLessThan(1_500);
    await expect(c.post(`http://127.0.0.1:${port}/big`, '{}', {})).rejects.toThrow(/larger than 1024 bytes/);
    await expect(c.post(`http://127.0.0.1:1/closed`, '{}', {})).rejects.toThrow(/connection failed \(ECONNREFUSED\)/);
  });
});
