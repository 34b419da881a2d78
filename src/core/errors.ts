/**
 * Errors that mean something to a client. The API renders each as application/problem+json
 * (RFC 9457) with `type`, `title`, `status` and `detail`; anything else is a 500 whose detail
 * hides internals.
 */

export interface FieldError {
  /** Dotted path of the offending field in the request, e.g. "num_steps". */
  field: string;
  /** Machine-readable rule that failed, e.g. "required", "max", "type", "unknown_field". */
  rule: string;
  message: string;
}

export class ProblemError extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    detail: string,
    readonly extra: Record<string, unknown> = {},
    readonly headers: Record<string, string> = {},
  ) {
    super(detail);
  }

  get type(): string {
    return `https://t2i.dev/problems/${this.title.toLowerCase().replace(/[^a-z0-9]+/g, '-')}`;
  }
}

export class ValidationError extends ProblemError {
  override name = 'ValidationError';
  constructor(readonly errors: FieldError[]) {
    super(400, 'Invalid request', errors.map((e) => `${e.field}: ${e.message}`).join('; '), { errors });
  }
}

export class NotFoundError extends ProblemError {
  override name = 'NotFoundError';
  constructor(detail = 'Not Found') {
    super(404, 'Not Found', detail);
  }
}

/** The textbook's 400 for an image that is not ready, and its siblings for failed or canceled jobs. */
export class ImageNotAvailableError extends ProblemError {
  override name = 'ImageNotAvailableError';
  constructor(detail: string, status: string, errorCode?: string) {
    super(400, 'Image not available', detail, { job_status: status, ...(errorCode ? { error_code: errorCode } : {}) });
  }
}

export class ConflictError extends ProblemError {
  override name = 'ConflictError';
  constructor(detail: string) {
    super(409, 'Conflict', detail);
  }
}

/** An Idempotency-Key sent again with a different request: the client must use a new key for a new request. */
export class IdempotencyConflictError extends ProblemError {
  override name = 'IdempotencyConflictError';
  constructor() {
    super(422, 'Idempotency key reused', 'This Idempotency-Key was used in the last 24 hours with a different request body; send a new key for a new request.');
  }
}

export class ServiceUnavailableError extends ProblemError {
  override name = 'ServiceUnavailableError';
  constructor(detail: string, retryAfterSeconds = 5) {
    super(503, 'Service Unavailable', detail, {}, { 'retry-after': String(retryAfterSeconds) });
  }
}

/** Over a tenant's quota: what was exceeded, its limit and use, and when it resets (Retry-After). */
export class QuotaExceededError extends ProblemError {
  override name = 'QuotaExceededError';
  constructor(
    detail: string,
    extra: { quota: 'in_flight' | 'daily_pixel_steps'; limit: number; used: number; requested?: number; resets_at: string | null },
    retryAfterSeconds: number,
  ) {
    super(429, 'Quota exceeded', detail, extra, { 'retry-after': String(retryAfterSeconds) });
  }
}

/** Too many requests for a key (or too many failed authentications from an address). */
export class RateLimitedError extends ProblemError {
  override name = 'RateLimitedError';
  constructor(detail: string, headers: Record<string, string>) {
    super(429, 'Too Many Requests', detail, {}, headers);
  }
}

/** No usable API key. The detail says what to send, never what was sent. */
export class UnauthorizedError extends ProblemError {
  override name = 'UnauthorizedError';
  constructor(detail: string) {
    super(401, 'Unauthorized', detail, {}, { 'www-authenticate': 'Bearer realm="t2i"' });
  }
}

export type Dependency = 'database' | 'job queue' | 'storage';

/**
 * A backing service is unreachable; retrying later may work. Adapters turn their technology's
 * connection errors (Prisma codes, SQLSTATEs, ioredis and socket errors) into this, so nothing
 * above them needs to know those; the API answers 503 with Retry-After.
 */
export class DependencyUnavailableError extends ServiceUnavailableError {
  override name = 'DependencyUnavailableError';
  constructor(
    readonly dependency: Dependency,
    options: { cause?: unknown } = {},
  ) {
    super(`The ${dependency} is unavailable. Please try again later.`);
    if (options.cause !== undefined) this.cause = options.cause;
  }
}
