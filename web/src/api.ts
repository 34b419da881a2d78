import type { CreateBody, FieldError, Limits } from './validate.js';

/**
 * The page's client of the API: same origin, the key in the Authorization header only, errors
 * as the API's problem+json. A 401 anywhere means the key no longer works: the page is told
 * (onUnauthorized) and signs out.
 */

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'canceled';

export interface Job {
  id: string;
  status: JobStatus;
  progress: number;
  prompt: string;
  negative_prompt: string | null;
  /** The model it runs on. */
  model: string | null;
  // Null only while a job waits for the first worker of a model never served (its defaults come from that worker).
  num_steps: number | null;
  guidance_scale: number | null;
  seed: number;
  width: number | null;
  height: number | null;
  scheduler: string | null;
  num_images: number;
  error: { code: string; message: string } | null;
  created_at: string;
}

export interface Defaults {
  num_steps: number;
  guidance_scale: number;
  width: number;
  height: number;
  scheduler: string;
}

export interface Models {
  /**
   * Served models (status serving), then those the server takes jobs for while none of their
   * workers runs (no_worker: the jobs wait in the model's queue); `default` is the model of a
   * request that names none. A model never served has no defaults yet.
   */
  models: Array<{
    id: string;
    status: 'serving' | 'no_worker';
    default: boolean;
    variant: string | null;
    workers: number;
    providers: string[];
    model_defaults: Defaults | null;
    schedulers: string[];
  }>;
  /** The default model's defaults; null when requests must name a model (several, no default). */
  request_defaults: (Defaults & { num_images: number; model: string }) | null;
  limits: Limits;
}

export interface Schedulers {
  schedulers: Array<{ name: string; description: string }>;
  default: string;
}

export interface Usage {
  tenant: string;
}

/** A refused or failed request, as the API explained it (or as the page could not reach it: status 0). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    message: string,
    readonly errors: FieldError[] = [],
    /** Seconds, from Retry-After (429, 503). */
    readonly retryAfter?: number,
  ) {
    super(message);
  }

  /** The sentence to show: the API's detail, and when to try again. */
  describe(): string {
    return this.retryAfter === undefined ? this.message : `${this.message} Try again in ${waitText(this.retryAfter)}.`;
  }
}

export class Api {
  constructor(
    private readonly key: string,
    private readonly onUnauthorized: (err: ApiError) => void,
  ) {}

  /** A request with the key; the answer, or an ApiError. */
  async request(method: string, path: string, init: { body?: unknown; headers?: Record<string, string>; signal?: AbortSignal } = {}): Promise<Response> {
    let res: Response;
    try {
      res = await fetch(path, {
        method,
        headers: {
          authorization: `Bearer ${this.key}`,
          ...(init.body === undefined ? {} : { 'content-type': 'application/json' }),
          ...init.headers,
        },
        ...(init.body === undefined ? {} : { body: JSON.stringify(init.body) }),
        ...(init.signal ? { signal: init.signal } : {}),
        // Never a cookie, never a redirect elsewhere with the key.
        credentials: 'omit',
        redirect: 'error',
      });
    } catch (err) {
      if (err instanceof DOMException && err.name === 'AbortError') throw err;
      throw new ApiError(0, 'Network error', 'Could not reach the API. Check your connection and try again.');
    }
    if (res.ok || res.status === 304) return res;
    const error = await problemOf(res);
    if (res.status === 401) this.onUnauthorized(error);
    throw error;
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    return (await (await this.request(method, path, body === undefined ? {} : { body })).json()) as T;
  }

  usage = () => this.json<Usage>('GET', '/usage');
  models = () => this.json<Models>('GET', '/models');
  schedulers = () => this.json<Schedulers>('GET', '/schedulers');
  submit = (body: CreateBody & { model?: string }) => this.json<Job>('POST', '/generated-images', body);
  cancel = (id: string) => this.json<Job>('POST', `/generated-images/${encodeURIComponent(id)}/cancel`);
  job = (id: string) => this.json<Job>('GET', `/generated-images/${encodeURIComponent(id)}`);
  list = (limit: number, cursor: string | null) =>
    this.json<{ items: Job[]; next_cursor: string | null }>('GET', `/generated-images?limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);

  /** An image of a succeeded job (the PNG, or its thumbnail) as bytes: shown and downloaded as blob URLs. */
  async image(id: string, index: number, thumbnail = false): Promise<Blob> {
    const res = await this.request('GET', `/generated-images/${encodeURIComponent(id)}/images/${index}${thumbnail ? '/thumbnail' : ''}`);
    return res.blob();
  }

  /** The job's event stream (Server-Sent Events read with fetch: EventSource cannot send the key). */
  events(id: string, lastEventId: string | null, signal: AbortSignal): Promise<Response> {
    return this.request('GET', `/generated-images/${encodeURIComponent(id)}/events`, {
      headers: { accept: 'text/event-stream', ...(lastEventId ? { 'last-event-id': lastEventId } : {}) },
      signal,
    });
  }
}

/** Retry-After in words: "12 s", "5 min", "7 h 20 min". */
function waitText(seconds: number): string {
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.ceil(seconds / 60)} min`;
  const m = Math.ceil(seconds / 60);
  return `${Math.floor(m / 60)} h${m % 60 ? ` ${m % 60} min` : ''}`;
}

/** An error answer as an ApiError: problem+json when it is one, the status line otherwise. */
async function problemOf(res: Response): Promise<ApiError> {
  const retry = Number(res.headers.get('retry-after'));
  const retryAfter = Number.isFinite(retry) && retry > 0 ? Math.ceil(retry) : undefined;
  try {
    const p = (await res.json()) as { title?: string; detail?: string; errors?: FieldError[] };
    return new ApiError(res.status, p.title ?? res.statusText, p.detail ?? `The API answered ${res.status}.`, p.errors ?? [], retryAfter);
  } catch {
    return new ApiError(res.status, res.statusText, `The API answered ${res.status} ${res.statusText}.`, [], retryAfter);
  }
}
