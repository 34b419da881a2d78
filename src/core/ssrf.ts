import { BlockList, isIP } from 'node:net';

/**
 * Which addresses a webhook may reach. A webhook URL is hostile input: without this, a client
 * could make our workers POST to the cloud metadata service, to Redis or Postgres on the private
 * network, or to the services on loopback. Refused (IANA special-purpose registries):
 *
 *   IPv4  0/8 this-network, 10/8 172.16/12 192.168/16 private, 100.64/10 CGNAT (and Alibaba's
 *         metadata 100.100.100.200), 127/8 loopback, 169.254/16 link-local (AWS, GCP, Azure
 *         metadata at 169.254.169.254), 192.0.0/24 protocol assignments, 192.0.2/24
 *         198.51.100/24 203.0.113/24 documentation, 192.88.99/24 6to4 relay, 198.18/15
 *         benchmarking, 224/4 multicast, 240/4 reserved and broadcast;
 *   IPv6  ::/128 unspecified, ::1 loopback, fc00::/7 unique-local (AWS's fd00:ec2::254
 *         metadata), fe80::/10 link-local, fec0::/10 site-local, ff00::/8 multicast,
 *         100::/64 discard, 2001::/23 protocol assignments (Teredo's 2001::/32 among them),
 *         2001:db8::/32 documentation; and every IPv6 form that carries an IPv4 address
 *         (::ffff:0:0/96 IPv4-mapped, ::/96 IPv4-compatible, 64:ff9b::/96 NAT64, 2002::/16
 *         6to4) is judged by the IPv4 address inside it.
 *
 * Host names that name metadata services are refused before any lookup. An allowlist
 * (WEBHOOK_ALLOWED_HOSTS: host names, addresses or CIDR ranges) opens specific destinations for
 * private deployments and tests.
 */

const V4: Array<[string, number, string]> = [
  ['0.0.0.0', 8, 'a "this network" address'],
  ['10.0.0.0', 8, 'a private address'],
  ['100.64.0.0', 10, 'a carrier-grade NAT address'],
  ['127.0.0.0', 8, 'a loopback address'],
  ['169.254.0.0', 16, 'a link-local address (cloud metadata lives there)'],
  ['172.16.0.0', 12, 'a private address'],
  ['192.0.0.0', 24, 'a reserved address'],
  ['192.0.2.0', 24, 'a documentation address'],
  ['192.88.99.0', 24, 'a reserved address'],
  ['192.168.0.0', 16, 'a private address'],
  ['198.18.0.0', 15, 'a reserved address'],
  ['198.51.100.0', 24, 'a documentation address'],
  ['203.0.113.0', 24, 'a documentation address'],
  ['224.0.0.0', 4, 'a multicast address'],
  ['240.0.0.0', 4, 'a reserved address'],
];

const V6: Array<[string, number, string]> = [
  ['::', 128, 'the unspecified address'],
  ['::1', 128, 'a loopback address'],
  ['100::', 64, 'a reserved address'],
  ['2001::', 23, 'a reserved address'],
  ['2001:db8::', 32, 'a documentation address'],
  ['fc00::', 7, 'a private (unique-local) address'],
  ['fe80::', 10, 'a link-local address'],
  ['fec0::', 10, 'a site-local address'],
  ['ff00::', 8, 'a multicast address'],
];

function ranges(table: Array<[string, number, string]>, type: 'ipv4' | 'ipv6') {
  return table.map(([net, prefix, reason]) => {
    const list = new BlockList();
    list.addSubnet(net, prefix, type);
    return { list, reason, type };
  });
}

const blocked = [...ranges(V4, 'ipv4'), ...ranges(V6, 'ipv6')];

/** Host names of metadata services, refused whatever they resolve to. */
const METADATA_HOSTS = new Set(['metadata', 'metadata.google.internal', 'metadata.goog', 'instance-data', 'instance-data.ec2.internal']);

/** The 128 bits of an IPv6 address as 8 numbers (node:net has no parser that returns them). */
function ipv6Words(address: string): number[] {
  let text = address.toLowerCase();
  const zone = text.indexOf('%');
  if (zone >= 0) text = text.slice(0, zone);
  // A trailing dotted IPv4 part (::ffff:1.2.3.4) is two words.
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted[1]!.split('.').map(Number) as [number, number, number, number];
    text = `${text.slice(0, -dotted[1]!.length)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.split('::') as [string, string | undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const fill = tail === undefined ? [] : Array<string>(8 - h.length - t.length).fill('0');
  return [...h, ...fill, ...t].map((w) => parseInt(w, 16));
}

/** The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), if any. */
function embeddedV4(address: string): string | undefined {
  const w = ipv6Words(address);
  const v4 = (hi: number, lo: number) => `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
  const zeros = (from: number, to: number) => w.slice(from, to).every((x) => x === 0);
  if (zeros(0, 5) && w[5] === 0xffff) return v4(w[6]!, w[7]!); // ::ffff:a.b.c.d
  if (zeros(0, 6) && (w[6] !== 0 || w[7]! > 1)) return v4(w[6]!, w[7]!); // ::a.b.c.d (deprecated, still routed by some stacks)
  if (w[0] === 0x64 && w[1] === 0xff9b && zeros(2, 6)) return v4(w[6]!, w[7]!); // 64:ff9b::a.b.c.d
  if (w[0] === 0x2002) return v4(w[1]!, w[2]!); // 2002:aabb:ccdd::
  return undefined;
}

/** Why an address may not be reached, or null when it is public. */
export function blockedReason(address: string): string | null {
  const family = isIP(address);
  if (family === 0) return 'not an IP address';
  if (family === 6) {
    const inner = embeddedV4(address);
    if (inner !== undefined) {
      const reason = blockedReason(inner);
      return reason ? `${reason} inside an IPv6 address` : null;
    }
  }
  const type = family === 4 ? 'ipv4' : 'ipv6';
  for (const b of blocked) if (b.type === type && b.list.check(address, type)) return b.reason;
  return null;
}

/** The allowlist: exact host names, and addresses or CIDR ranges. */
export class HostAllowlist {
  private readonly names = new Set<string>();
  private readonly ranges = new BlockList();

  /** Entries as WEBHOOK_ALLOWED_HOSTS lists them; throws on one that is none of the three forms. */
  constructor(entries: readonly string[]) {
    for (const raw of entries) {
      const entry = raw.trim().toLowerCase();
      if (!entry) continue;
      const [net, prefix] = entry.split('/') as [string, string | undefined];
      const family = isIP(net);
      if (family) {
        const type = family === 4 ? 'ipv4' : 'ipv6';
        if (prefix === undefined) this.ranges.addAddress(net, type);
        else this.ranges.addSubnet(net, Number(prefix), type);
      } else if (/^[a-z0-9.-]+$/.test(entry) && prefix === undefined) {
        this.names.add(entry.replace(/\.$/, ''));
      } else {
        throw new Error(`"${raw}" is not a host name, an IP address or a CIDR range`);
      }
    }
  }

  hasName(host: string): boolean {
    return this.names.has(host.toLowerCase().replace(/\.$/, ''));
  }

  hasAddress(address: string): boolean {
    const family = isIP(address);
    return family !== 0 && this.ranges.check(address, family === 4 ? 'ipv4' : 'ipv6');
  }
}

/** A webhook URL refused, with a public reason (a rule name and a sentence). */
export class WebhookUrlError extends Error {
  override name = 'WebhookUrlError';
  constructor(
    readonly rule: 'url' | 'scheme' | 'credentials' | 'blocked_host' | 'blocked_address' | 'unresolvable',
    message: string,
  ) {
    super(message);
  }
}

/** The most of a URL we accept. */
export const MAX_WEBHOOK_URL_LENGTH = 2048;

/** What can be said of a URL without looking its host up: a URL, http(s), no credentials, no metadata host, no blocked literal address. */
export function checkWebhookUrl(raw: string, allow: HostAllowlist): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new WebhookUrlError('url', 'must be an absolute http:// or https:// URL');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new WebhookUrlError('scheme', 'must use http or https');
  if (url.username || url.password) throw new WebhookUrlError('credentials', 'must not carry a user name or password');
  const host = hostOf(url);
  if (allow.hasName(host)) return url;
  if (METADATA_HOSTS.has(host.replace(/\.$/, ''))) throw new WebhookUrlError('blocked_host', 'must not name a cloud metadata service');
  if (isIP(host)) {
    const reason = allow.hasAddress(host) ? null : blockedReason(host);
    if (reason) throw new WebhookUrlError('blocked_address', `must not point to ${reason}`);
  }
  return url;
}

/** The URL's host as an address or a name: IPv6 without its brackets, lower case. */
export function hostOf(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, '').toLowerCase();
}

export interface ResolvedAddress {
  address: string;
  family: 4 | 6;
}

/**
 * The addresses a host may be reached at: the URL checks above, then every address it resolves
 * to must be allowed (one blocked answer refuses the host: an attacker's DNS can answer with a
 * public and a private address at once). The caller must connect to one of these, not look the
 * host up again (that second answer could differ: DNS rebinding).
 */
export async function resolveWebhookHost(url: URL, allow: HostAllowlist, lookup: (host: string) => Promise<ResolvedAddress[]>): Promise<ResolvedAddress[]> {
  const host = hostOf(url);
  const literal = isIP(host);
  if (literal) return [{ address: host, family: literal as 4 | 6 }];
  let addresses: ResolvedAddress[];
  try {
    addresses = await lookup(host);
  } catch {
    throw new WebhookUrlError('unresolvable', 'has a host name that does not resolve');
  }
  if (addresses.length === 0) throw new WebhookUrlError('unresolvable', 'has a host name that does not resolve');
  if (allow.hasName(host)) return addresses;
  for (const a of addresses) {
    const reason = allow.hasAddress(a.address) ? null : blockedReason(a.address);
    if (reason) throw new WebhookUrlError('blocked_address', `has a host name that resolves to ${reason}`);
  }
  return addresses;
}
