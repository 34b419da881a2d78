/**
 * A small Server-Sent Events client for the stream benchmark and tests, on Node's fetch: what a browser's
 * EventSource does (id, event and data fields; comment lines), plus the time each event arrived.
 */

export interface SseEvent {
  id?: string;
  event: string;
  data: Record<string, unknown>;
  /** performance.timeOrigin + performance.now() when the event's last line arrived (epoch ms). */
  receivedAt: number;
}

export interface SseConnection {
  status: number;
  headers: Headers;
  /** The body when the answer is not an event stream (a problem+json error). */
  errorBody?: unknown;
  events: AsyncGenerator<SseEvent>;
  /** Comment lines seen so far (heartbeats). */
  comments(): number;
  close(): void;
}

export async function openSse(url: string, headers: Record<string, string> = {}, fetchImpl: typeof fetch = fetch): Promise<SseConnection> {
  const controller = new AbortController();
  const res = await fetchImpl(url, { headers: { accept: 'text/event-stream', ...headers }, signal: controller.signal });
  let comments = 0;
  if (!res.headers.get('content-type')?.startsWith('text/event-stream')) {
    const text = await res.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON
    }
    return {
      status: res.status,
      headers: res.headers,
      errorBody: body,
      events: (async function* () {})(),
      comments: () => 0,
      close: () => controller.abort(),
    };
  }
  const reader: ReadableStreamDefaultReader<Uint8Array> = res.body!.getReader();
  const decoder = new TextDecoder();
  async function* events(): AsyncGenerator<SseEvent> {
    let buffer = '';
    let current: { id?: string; event?: string; data: string[] } = { data: [] };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let nl: number;
        while ((nl = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, '');
          buffer = buffer.slice(nl + 1);
          if (line === '') {
            if (current.data.length > 0) {
              yield {
                ...(current.id !== undefined ? { id: current.id } : {}),
                event: current.event ?? 'message',
                data: JSON.parse(current.data.join('\n')) as Record<string, unknown>,
                receivedAt: performance.timeOrigin + performance.now(),
              };
            }
            current = { data: [] };
          } else if (line.startsWith(':')) {
            comments++;
          } else {
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'data') current.data.push(value);
            else if (field === 'id') current.id = value;
            else if (field === 'event') current.event = value;
          }
        }
      }
    } catch (err) {
      if ((err as Error).name === 'AbortError') return;
      throw err;
    }
  }
  return { status: res.status, headers: res.headers, events: events(), comments: () => comments, close: () => controller.abort() };
}
