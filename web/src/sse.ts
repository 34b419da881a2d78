/**
 * Server-Sent Events from a fetch Response: the id, event and data fields, comment lines skipped,
 * as a browser's EventSource reads them (which cannot send an Authorization header).
 */

export interface StreamEvent {
  id?: string;
  event: string;
  data: Record<string, unknown>;
}

export async function* readEvents(res: Response): AsyncGenerator<StreamEvent> {
  if (!res.body) return;
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let current: { id?: string; event?: string; data: string[] } = { data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl: number;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, '');
        buffer = buffer.slice(nl + 1);
        if (line === '') {
          // A blank line ends an event; one without data (the retry: line) is nothing to deliver.
          if (current.data.length > 0) {
            yield {
              ...(current.id !== undefined ? { id: current.id } : {}),
              event: current.event ?? 'message',
              data: JSON.parse(current.data.join('\n')) as Record<string, unknown>,
            };
          }
          current = { data: [] };
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'data') current.data.push(value);
          else if (field === 'id') current.id = value;
          else if (field === 'event') current.event = value;
        }
      }
    }
  } finally {
    // Closes the connection when the reader stops early (a new job, sign-out).
    await reader.cancel().catch(() => undefined);
  }
}
