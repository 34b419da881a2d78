import { eventIdAfter, isTerminal, type JobEventLog, type LoggedEvent } from './job-events.js';
import type { ImageRecord } from './images.js';

/**
 * Follows one job for a client, whatever transport carries it (SSE, WebSocket): the events after
 * the client's Last-Event-ID from the job's log, then live ones, ending with the terminal event.
 *
 * Correct when a client connects mid-job or resumes: it subscribes before reading the log, so
 * nothing falls between the two, and drops what it has already sent by id. Robust when the live
 * path loses something (a Redis reconnect drops pub/sub messages; a worker died between its
 * database write and its publish): every `checkMs` it reads the log again after the last id, and
 * checks the job row, which is the truth. A row that is terminal while no terminal event arrived
 * within `terminalGraceMs` ends the stream from the row. While the job waits, the same check
 * sends its place in the queue when it changes.
 */

export interface ClientEvent {
  /** Stream id for Last-Event-ID; absent on events made from the row or the queue (they are not replayable). */
  id?: string;
  event: 'status' | 'queue' | 'progress' | 'preview' | 'done' | 'failed' | 'canceled';
  data: Record<string, unknown>;
}

export interface JobEventStreamDeps {
  log: JobEventLog;
  /** The job as its caller may see it: throws NotFoundError otherwise. */
  getJob(id: string): Promise<ImageRecord>;
  /** What `done` carries besides the status: the image URL(s). */
  result(record: ImageRecord): Promise<Record<string, unknown>>;
  /** Jobs ahead of this one in its model's queue, null when it is not waiting. */
  position(record: ImageRecord): Promise<number | null>;
  /** How often the log is re-read and the row checked. Default 1000 ms. */
  checkMs?: number;
  /** How long a terminal row may go without its terminal event before the row ends the stream. Default 2000 ms. */
  terminalGraceMs?: number;
  logger?: { warn(obj: object, msg: string): void };
}

/** Events read from the log at a time. */
const PAGE = 500;

export interface JobFollow extends AsyncIterable<ClientEvent> {
  /** Ends the iteration (the client left); safe to call more than once. */
  close(): void;
}

/**
 * Starts following a job. Rejects (NotFoundError, DependencyUnavailableError) before anything is
 * sent when the job cannot be streamed, so the transport can answer with a plain error.
 */
export async function followJob(deps: JobEventStreamDeps, id: string, lastEventId: string | null): Promise<JobFollow> {
  const checkMs = deps.checkMs ?? 1_000;
  const graceMs = deps.terminalGraceMs ?? 2_000;
  const first = await deps.getJob(id);
  const buffer: LoggedEvent[] = [];
  let wake: (() => void) | undefined;
  let closed = false;
  const unsubscribe = await deps.log.subscribe(id, (e) => {
    buffer.push(e);
    wake?.();
  });

  const close = () => {
    if (closed) return;
    closed = true;
    unsubscribe();
    wake?.();
  };

  async function* events(): AsyncGenerator<ClientEvent> {
    let last = lastEventId;
    let lastPosition: number | null | undefined;
    let terminalRowSince: number | undefined;
    const fromLog = async function* (entries: LoggedEvent[]): AsyncGenerator<ClientEvent, boolean> {
      for (const e of entries) {
        if (last !== null && !eventIdAfter(e.id, last)) continue;
        last = e.id;
        const record = isTerminal(e.event) ? await deps.getJob(id).catch(() => first) : first;
        yield await toClient(e, record);
        if (isTerminal(e.event)) return true;
      }
      return false;
    };
    const readAll = async (): Promise<LoggedEvent[]> => {
      const out: LoggedEvent[] = [];
      for (;;) {
        const page = await deps.log.read(id, out.at(-1)?.id ?? last, PAGE);
        out.push(...page);
        if (page.length < PAGE) return out;
      }
    };
    const toClient = async (e: LoggedEvent, record: ImageRecord): Promise<ClientEvent> => {
      const { type, ...data } = e.event;
      switch (type) {
        case 'succeeded':
          return { id: e.id, event: 'done', data: { status: 'succeeded', ...(await deps.result(record)), ...data } };
        case 'failed':
          return { id: e.id, event: 'failed', data: { status: 'failed', ...data } };
        case 'canceled':
          return { id: e.id, event: 'canceled', data: { status: 'canceled', ...data } };
        default:
          return { id: e.id, event: type, data };
      }
    };
    /** The terminal event made from the row, when the log has none. */
    const fromRow = async (r: ImageRecord): Promise<ClientEvent> => {
      const at = (r.finishedAt ?? r.updatedAt).getTime();
      if (r.status === 'succeeded') return { event: 'done', data: { status: 'succeeded', ...(await deps.result(r)), at } };
      if (r.status === 'failed') return { event: 'failed', data: { status: 'failed', error: { code: r.errorCode ?? 'internal', message: r.error ?? '' }, at } };
      return { event: 'canceled', data: { status: 'canceled', at } };
    };
    const terminalRow = (r: ImageRecord) => r.status === 'succeeded' || r.status === 'failed' || r.status === 'canceled';

    try {
      const history = await readAll();
      if (yield* fromLog(history)) return;
      if (history.length === 0 && last === null) {
        // Nothing logged (expired, or the log was unreachable when the job changed): the row speaks.
        if (terminalRow(first)) {
          yield await fromRow(first);
          return;
        }
        yield { event: 'status', data: { status: first.status, attempt: first.attempts, progress: first.progress, at: Date.now() } };
      }
      let nextCheck = 0;
      while (!closed) {
        const live = buffer.splice(0);
        if (yield* fromLog(live)) return;
        if (performance.now() >= nextCheck) {
          nextCheck = performance.now() + checkMs;
          try {
            if (yield* fromLog(await readAll())) return;
            const row = await deps.getJob(id);
            if (terminalRow(row)) {
              terminalRowSince ??= performance.now();
              if (performance.now() - terminalRowSince >= graceMs) {
                yield await fromRow(row);
                return;
              }
            } else if (row.status === 'queued') {
              const position = await deps.position(row);
              if (position !== lastPosition && position !== null) yield { event: 'queue', data: { jobs_ahead: position, at: Date.now() } };
              lastPosition = position;
            }
          } catch (err) {
            // Postgres or Redis away for a moment: the stream waits for them (heartbeats go on).
            if ((err as Error).name === 'NotFoundError') return;
            deps.logger?.warn({ err }, 'event stream check failed');
          }
        }
        if (buffer.length === 0 && !closed) {
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, Math.max(1, nextCheck - performance.now()));
            wake = () => {
              clearTimeout(timer);
              resolve();
            };
          });
          wake = undefined;
        }
      }
    } finally {
      close();
    }
  }

  const iterator = events();
  return {
    close,
    [Symbol.asyncIterator]: () => iterator,
  };
}
