import { promises as dns, type LookupAddress } from 'node:dns';
import * as http from 'node:http';
import * as https from 'node:https';
import type { Config } from '../config.js';
import { checkWebhookUrl, HostAllowlist, hostOf, resolveWebhookHost, WebhookUrlError, type ResolvedAddress } from '../core/ssrf.js';

/**
 * The HTTP client webhooks are sent with, built not to be turned against us (core/ssrf.ts says
 * what is refused):
 *   - the URL is checked, then its host resolved once and every address checked;
 *   - the socket connects to an address that was checked: node's `lookup` hook hands the
 *     connection the checked answer, so a second DNS answer (rebinding) is never asked for;
 *     TLS still verifies the certificate against the URL's host name;
 *   - no redirects (node's http never follows them; a 3xx is an answer like any other);
 *   - one deadline for connecting, sending and reading; at most `maxResponseBytes` read;
 *   - no connection reuse (agent: false), so nothing outlives the attempt.
 */

export type Lookup = (host: string) => Promise<ResolvedAddress[]>;

/** The system resolver (getaddrinfo: /etc/hosts, then DNS), every address. */
export const systemLookup: Lookup = async (host) =>
  (await dns.lookup(host, { all: true, verbatim: true })).map((a: LookupAddress) => ({ address: a.address, family: a.family === 6 ? 6 : 4 }));

/** Given DNS servers ("host:port"), asked directly for A and AAAA records. */
export function dnsServersLookup(servers: readonly string[], timeoutMs = 2_000): Lookup {
  const resolver = new dns.Resolver({ timeout: timeoutMs, tries: 2 });
  resolver.setServers([...servers]);
  return async (host) => {
    const [v4, v6] = await Promise.allSettled([resolver.resolve4(host), resolver.resolve6(host)]);
    const out: ResolvedAddress[] = [];
    if (v4.status === 'fulfilled') out.push(...v4.value.map((address) => ({ address, family: 4 as const })));
    if (v6.status === 'fulfilled') out.push(...v6.value.map((address) => ({ address, family: 6 as const })));
    if (out.length === 0 && v4.status === 'rejected') throw v4.reason as Error;
    return out;
  };
}

export interface WebhookClientOptions {
  allow: HostAllowlist;
  lookup: Lookup;
  timeoutMs: number;
  maxResponseBytes: number;
  userAgent: string;
}

export interface WebhookResponse {
  status: number;
}

/** A send that got no usable answer. `permanent` when retrying cannot help (the address is refused). */
export class WebhookSendError extends Error {
  override name = 'WebhookSendError';
  constructor(
    message: string,
    readonly permanent: boolean,
    options: { cause?: unknown } = {},
  ) {
    super(message, options);
  }
}

export interface WebhookClient {
  /** Checks a URL the way a send will (URL, then DNS); throws WebhookUrlError. */
  check(url: string): Promise<void>;
  post(url: string, body: string, headers: Record<string, string>): Promise<WebhookResponse>;
}

export function createWebhookClient(opts: WebhookClientOptions): WebhookClient {
  const resolve = async (raw: string) => {
    const url = checkWebhookUrl(raw, opts.allow);
    return { url, addresses: await resolveWebhookHost(url, opts.allow, opts.lookup) };
  };
  return {
    async check(url) {
      await resolve(url);
    },
    async post(raw, body, headers) {
      let target: Awaited<ReturnType<typeof resolve>>;
      try {
        target = await resolve(raw);
      } catch (err) {
        if (err instanceof WebhookUrlError) throw new WebhookSendError(`refused: the URL ${err.message}`, err.rule !== 'unresolvable', { cause: err });
        throw err;
      }
      const { url, addresses } = target;
      const chosen = addresses[0]!;
      const mod = url.protocol === 'https:' ? https : http;
      return new Promise<WebhookResponse>((resolvePost, reject) => {
        const fail = (message: string, cause?: unknown) => {
          req.destroy();
          reject(new WebhookSendError(message, false, { cause }));
        };
        const deadline = setTimeout(() => fail(`no answer within ${opts.timeoutMs} ms`), opts.timeoutMs);
        const req = mod.request(
          {
            protocol: url.protocol,
            // The name stays the URL's (Host header, TLS server name and certificate check) ...
            hostname: hostOf(url),
            port: url.port || (url.protocol === 'https:' ? 443 : 80),
            path: `${url.pathname}${url.search}`,
            method: 'POST',
            agent: false,
            headers: { ...headers, 'content-length': Buffer.byteLength(body), 'user-agent': opts.userAgent, host: url.host },
            // ... but the socket goes to the address that was checked, never to a fresh lookup.
            lookup: (_host, options, callback) => {
              const cb = callback;
              if (options.all) cb(null, [{ address: chosen.address, family: chosen.family }]);
              else cb(null, chosen.address, chosen.family);
            },
          },
          (res) => {
            let received = 0;
            res.on('data', (chunk: Buffer) => {
              received += chunk.length;
              if (received > opts.maxResponseBytes) {
                clearTimeout(deadline);
                fail(`the response was larger than ${opts.maxResponseBytes} bytes`);
              }
            });
            res.on('end', () => {
              clearTimeout(deadline);
              resolvePost({ status: res.statusCode ?? 0 });
            });
            res.on('error', (err) => {
              clearTimeout(deadline);
              fail('the connection failed while reading the response', err);
            });
          },
        );
        req.on('error', (err: Error & { code?: string }) => {
          clearTimeout(deadline);
          // The code (ECONNREFUSED, ETIMEDOUT, CERT_HAS_EXPIRED) is public; the address is not repeated.
          fail(`the connection failed (${err.code ?? 'error'})`, err);
        });
        req.end(body);
      });
    },
  };
}

/** Most of a receiver's answer read before the attempt is given up. */
const MAX_RESPONSE_BYTES = 64 * 1024;

/** The client as the configuration describes it (WEBHOOK_*). */
export function webhookClientFromConfig(
  c: Pick<Config, 'WEBHOOK_ALLOWED_HOSTS' | 'WEBHOOK_DNS_SERVERS' | 'WEBHOOK_TIMEOUT_MS'>,
  userAgent: string,
): WebhookClient {
  return createWebhookClient({
    allow: new HostAllowlist(c.WEBHOOK_ALLOWED_HOSTS),
    lookup: c.WEBHOOK_DNS_SERVERS ? dnsServersLookup(c.WEBHOOK_DNS_SERVERS) : systemLookup,
    timeoutMs: c.WEBHOOK_TIMEOUT_MS,
    maxResponseBytes: MAX_RESPONSE_BYTES,
    userAgent,
  });
}
