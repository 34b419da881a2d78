import { createServer, type Server } from 'node:http';
import { gunzipSync } from 'node:zlib';

/**
 * A local HTTP server standing in for Sentry's ingest (POST /api/<project>/envelope/): it records
 * every envelope the SDK sends, raw and decoded, so a test can read the events or search them.
 */
export interface SentryIngest {
  dsn: string;
  /** Every envelope received, as sent (after gzip). */
  raw: string[];
  /** The events among them. */
  events(): Array<Record<string, unknown>>;
  close(): Promise<void>;
}

export async function startSentryIngest(project = 42): Promise<SentryIngest> {
  const raw: string[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      let body = Buffer.concat(chunks);
      if (req.headers['content-encoding'] === 'gzip') body = gunzipSync(body);
      raw.push(body.toString('utf8'));
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    dsn: `http://publickey@127.0.0.1:${port}/${project}`,
    raw,
    events() {
      // An envelope: a header line, then pairs of item header and payload lines.
      return raw.flatMap((text) => {
        const lines = text.split('\n').filter(Boolean);
        const out: Array<Record<string, unknown>> = [];
        for (let i = 1; i + 1 < lines.length; i += 2) {
          if ((JSON.parse(lines[i]!) as { type: string }).type === 'event') out.push(JSON.parse(lines[i + 1]!) as Record<string, unknown>);
        }
        return out;
      });
    },
    close: () => new Promise((r) => server.close(() => r())),
  };
}
