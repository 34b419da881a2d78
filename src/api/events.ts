import websocket from '@fastify/websocket';
import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import type { WebSocket } from 'ws';
import { z } from 'zod';
import { ProblemError, ValidationError } from '../core/errors.js';
import type { ClientEvent, JobFollow } from '../core/job-event-stream.js';
import { EVENT_ID } from '../core/job-events.js';
import { fieldErrors } from '../core/params.js';
import { sendProblem } from './problem.js';
import { jobIdParams, problems } from './schemas.js';

/**
 * Live job events for clients, in two transports over one core (src/core/job-event-stream.ts):
 *
 *   GET /generated-images/{id}/events   Server-Sent Events for one job. Resume with the
 *                                       Last-Event-ID header (browsers send it on reconnect) or
 *                                       ?last_event_id=. Comment lines every heartbeat keep
 *                                       proxies from closing a quiet stream; it ends after the
 *                                       terminal event (done, failed or canceled).
 *   GET /events  (WebSocket)            one connection, many jobs: {"op":"subscribe","id":...,
 *                                       "last_event_id"?:...} and {"op":"unsubscribe","id":...};
 *                                       the server sends {"type":"event","job_id","id","event",
 *                                       "data"}, {"type":"end","job_id"} after a job's terminal
 *                                       event, and {"type":"error",...} problems. Pings every heartbeat.
 *
 * Both are behind the API key: the WebSocket authenticates at its upgrade request, and every job
 * it follows is the caller's tenant's. A job that cannot be streamed (unknown, or another
 * tenant's, alike) is answered before any event: 404 problem+json on SSE, an error message on
 * the WebSocket.
 */

export interface EventRoutesOptions {
  /** Starts following a job of the tenant (src/core/job-event-stream.ts followJob, bound to its collaborators). */
  follow(tenantId: string, id: string, lastEventId: string | null): Promise<JobFollow>;
  /** The caller's tenant (the auth hook has run). */
  tenantOf(request: FastifyRequest): string;
  /** Interval of SSE comment lines and WebSocket pings. */
  heartbeatMs: number;
  /** Subscriptions one WebSocket may hold at once. */
  maxSubscriptions?: number;
}

/** A stream that falls this far behind (a client that stopped reading) is dropped, bounding memory. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024;

function lastEventIdOf(request: FastifyRequest<{ Querystring: { last_event_id?: string } }>): string | null {
  const header = request.headers['last-event-id'];
  const value = (Array.isArray(header) ? header[0] : header) ?? request.query.last_event_id;
  if (value === undefined || value === '') return null;
  if (!EVENT_ID.test(value)) {
    throw new ValidationError([{ field: 'Last-Event-ID', rule: 'format', message: 'must be an event id this API sent (digits-digits)' }]);
  }
  return value;
}

function sseFrame(e: ClientEvent): string {
  return `${e.id ? `id: ${e.id}\n` : ''}event: ${e.event}\ndata: ${JSON.stringify(e.data)}\n\n`;
}

const clientMessage = z.discriminatedUnion('op', [
  z.strictObject({
    op: z.literal('subscribe'),
    id: z.string().max(100),
    last_event_id: z.string().regex(EVENT_ID, 'must be an event id this API sent').optional(),
  }),
  z.strictObject({ op: z.literal('unsubscribe'), id: z.string().max(100) }),
]);

const sseSchema = {
  tags: ['events'],
  summary: 'Follow a job live (Server-Sent Events)',
  description:
    'Events: status {status, attempt, error?}; queue {jobs_ahead} (no id); progress {attempt, step, total, percent, eta_ms}; preview {attempt, step, total, content_type, width, height, data (base64 WebP, ~128 px)}; done {status, url, expires_at, images}; failed {status, error {code, message}}; canceled {status}. Every event has `at` (epoch ms). Resume with Last-Event-ID. Comment lines are heartbeats. The stream ends after done, failed or canceled.',
  params: jobIdParams,
  querystring: z.object({ last_event_id: z.string().regex(EVENT_ID).optional().meta({ description: 'Instead of the Last-Event-ID header' }) }),
  headers: z.looseObject({ 'last-event-id': z.string().regex(EVENT_ID).optional().meta({ description: 'The last id received: events after it follow' }) }),
  response: {
    200: { description: 'An event stream', content: { 'text/event-stream': { schema: z.string() } } },
    ...problems(400, 401, 404, 429, 503),
  },
};

const wsSchema = {
  tags: ['events'],
  summary: 'Follow several jobs on one WebSocket',
  description:
    'Upgrade to a WebSocket. Send {"op":"subscribe","id":JOB,"last_event_id"?:ID} and {"op":"unsubscribe","id":JOB}; receive {"type":"subscribed"|"unsubscribed","job_id"}, {"type":"event","job_id","id","event","data"} (the SSE events), {"type":"end","job_id"}, {"type":"error","job_id"?,"status","title","detail"}. Pings every heartbeat.',
  response: { 101: z.undefined().meta({ description: 'Switching Protocols: the connection is a WebSocket from here on' }), ...problems(401, 426, 429) },
};

export const eventRoutes: FastifyPluginAsync<EventRoutesOptions> = async (app: FastifyInstance, opts) => {
  const open = new Set<JobFollow>();
  // Streams end with the server: Fastify's close waits for open connections otherwise.
  app.addHook('preClose', async () => {
    for (const f of open) f.close();
  });

  app.get<{ Params: { id: string }; Querystring: { last_event_id?: string } }>(
    '/generated-images/:id/events',
    { schema: sseSchema },
    async (request, reply) => {
      const follow = await opts.follow(opts.tenantOf(request), request.params.id, lastEventIdOf(request));
      open.add(follow);
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, {
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache, no-transform',
        connection: 'keep-alive',
        // nginx buffers responses by default; an event stream must pass through at once.
        'x-accel-buffering': 'no',
        'x-request-id': request.id,
      });
      // How long a browser's EventSource waits before reconnecting (with Last-Event-ID).
      res.write('retry: 2000\n\n');
      const heartbeat = setInterval(() => res.write(': keep-alive\n\n'), opts.heartbeatMs);
      request.raw.once('close', () => follow.close());
      try {
        for await (const e of follow) {
          res.write(sseFrame(e));
          if (res.writableLength > MAX_BUFFERED_BYTES) break;
        }
      } catch (err) {
        // Headers are gone: the client sees the stream end and reconnects with its Last-Event-ID.
        request.log.warn({ err }, 'event stream failed');
      } finally {
        clearInterval(heartbeat);
        follow.close();
        open.delete(follow);
        res.end();
      }
    },
  );

  await app.register(websocket, { options: { maxPayload: 16 * 1024 } });

  app.route({
    method: 'GET',
    url: '/events',
    schema: wsSchema,
    // A plain GET on the WebSocket route: say what it is rather than a bare 404.
    handler: (_request, reply) => sendProblem(reply, 426, 'Upgrade Required', 'GET /events is a WebSocket endpoint; connect with a WebSocket client.'),
    wsHandler: (socket, request) => serveSocket(socket, request),
  });

  function serveSocket(socket: WebSocket, request: FastifyRequest): void {
    // Authenticated at the upgrade: every subscription of the connection is this tenant's.
    const tenantId = opts.tenantOf(request);
    const subs = new Map<string, JobFollow>();
    const max = opts.maxSubscriptions ?? 100;
    const send = (msg: Record<string, unknown>) => {
      if (socket.readyState !== socket.OPEN) return;
      if (socket.bufferedAmount > MAX_BUFFERED_BYTES) {
        socket.terminate();
        return;
      }
      socket.send(JSON.stringify(msg));
    };
    const problem = (err: unknown, jobId?: string) => {
      if (err instanceof ProblemError) {
        send({ type: 'error', ...(jobId ? { job_id: jobId } : {}), status: err.status, title: err.title, detail: err.message, ...err.extra });
      } else {
        request.log.error({ err }, 'websocket subscription failed');
        send({
          type: 'error',
          ...(jobId ? { job_id: jobId } : {}),
          status: 500,
          title: 'Internal Server Error',
          detail: 'The server failed; it has been logged.',
        });
      }
    };

    let alive = true;
    socket.on('pong', () => (alive = true));
    const heartbeat = setInterval(() => {
      if (!alive) {
        socket.terminate();
        return;
      }
      alive = false;
      socket.ping();
    }, opts.heartbeatMs);

    const subscribe = async (id: string, lastEventId: string | null) => {
      if (subs.has(id)) return;
      if (subs.size >= max) {
        send({ type: 'error', job_id: id, status: 429, title: 'Too Many Subscriptions', detail: `A connection may follow at most ${max} jobs at once.` });
        return;
      }
      const follow = await opts.follow(tenantId, id, lastEventId);
      subs.set(id, follow);
      send({ type: 'subscribed', job_id: id });
      try {
        for await (const e of follow) send({ type: 'event', job_id: id, ...e });
        if (subs.get(id) === follow) send({ type: 'end', job_id: id });
      } finally {
        follow.close();
        if (subs.get(id) === follow) subs.delete(id);
      }
    };

    socket.on('message', (raw: Buffer, isBinary: boolean) => {
      let parsed: z.infer<typeof clientMessage>;
      try {
        if (isBinary) throw new ValidationError([{ field: '(message)', rule: 'type', message: 'must be a JSON text message' }]);
        let json: unknown;
        try {
          json = JSON.parse(raw.toString('utf8'));
        } catch {
          throw new ValidationError([{ field: '(message)', rule: 'json', message: 'is not valid JSON' }]);
        }
        const result = clientMessage.safeParse(json, { reportInput: true });
        if (!result.success) throw new ValidationError(fieldErrors(result.error));
        parsed = result.data;
      } catch (err) {
        problem(err);
        return;
      }
      if (parsed.op === 'unsubscribe') {
        subs.get(parsed.id)?.close();
        subs.delete(parsed.id);
        send({ type: 'unsubscribed', job_id: parsed.id });
        return;
      }
      const { id } = parsed;
      subscribe(id, parsed.last_event_id ?? null).catch((err: unknown) => problem(err, id));
    });

    socket.on('close', () => {
      clearInterval(heartbeat);
      for (const f of subs.values()) f.close();
      subs.clear();
    });
  }
};
