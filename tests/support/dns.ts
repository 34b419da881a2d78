import { createSocket, type Socket } from 'node:dgram';
import { isIP } from 'node:net';

/**
 * A tiny authoritative DNS server on 127.0.0.1 (UDP) for tests: it answers A and AAAA questions
 * from a table the test controls (and may change while it runs, to play DNS rebinding), and
 * NXDOMAIN for anything else. Enough of RFC 1035 for Node's resolver (c-ares) and nothing more.
 */
export class TestDns {
  private socket: Socket | undefined;
  readonly records = new Map<string, string[]>();
  /** Questions asked, by name, for tests that check how often a host was looked up. */
  readonly asked: string[] = [];
  port = 0;

  set(name: string, ...addresses: string[]): void {
    this.records.set(name.toLowerCase(), addresses);
  }

  async start(): Promise<void> {
    const socket = createSocket('udp4');
    socket.on('message', (msg, rinfo) => {
      const answer = this.answer(msg);
      if (answer) socket.send(answer, rinfo.port, rinfo.address);
    });
    await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', resolve));
    this.socket = socket;
    this.port = socket.address().port;
  }

  get server(): string {
    return `127.0.0.1:${this.port}`;
  }

  private answer(query: Buffer): Buffer | undefined {
    if (query.length < 12) return undefined;
    // Question: labels, then type and class.
    const labels: string[] = [];
    let off = 12;
    while (off < query.length && query[off]! > 0) {
      const len = query[off]!;
      labels.push(query.subarray(off + 1, off + 1 + len).toString('latin1'));
      off += len + 1;
    }
    const questionEnd = off + 5;
    if (questionEnd > query.length) return undefined;
    const qtype = query.readUInt16BE(off + 1);
    const name = labels.join('.').toLowerCase();
    this.asked.push(name);
    const known = this.records.get(name);
    const family = qtype === 1 ? 4 : qtype === 28 ? 6 : 0;
    const addresses = (known ?? []).filter((a) => isIP(a) === family);
    const header = Buffer.alloc(12);
    query.copy(header, 0, 0, 2); // id
    // QR, opcode 0, AA, RD copied, RA; rcode 3 (NXDOMAIN) for unknown names.
    header.writeUInt16BE(0x8400 | (query.readUInt16BE(2) & 0x0100) | 0x0080 | (known ? 0 : 3), 2);
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(addresses.length, 6);
    const answers = addresses.map((a) => {
      const rr = Buffer.alloc(12);
      rr.writeUInt16BE(0xc00c, 0); // pointer to the question's name
      rr.writeUInt16BE(qtype, 2);
      rr.writeUInt16BE(1, 4); // IN
      rr.writeUInt32BE(0, 6); // TTL 0: never cached
      const data = family === 4 ? Buffer.from(a.split('.').map(Number)) : ipv6Bytes(a);
      rr.writeUInt16BE(data.length, 10);
      return Buffer.concat([rr, data]);
    });
    return Buffer.concat([header, query.subarray(12, questionEnd), ...answers]);
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => (this.socket ? this.socket.close(() => resolve()) : resolve()));
  }
}

function ipv6Bytes(address: string): Buffer {
  const [head = '', tail] = address.split('::');
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const words = [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.alloc(16);
  words.forEach((w, i) => out.writeUInt16BE(parseInt(w, 16), i * 2));
  return out;
}
