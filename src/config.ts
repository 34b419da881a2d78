import { isIP } from 'node:net';
import { z } from 'zod';
import { MODEL_NAME_PATTERN } from './core/jobs.js';
import { HostAllowlist } from './core/ssrf.js';

/**
 * The one environment schema, parsed once at boot by each process. Every variable is listed
 * in .env.example with the same comment. Invalid configuration fails fast, listing every
 * problem at once rather than the first.
 */

const bool = z.enum(['true', 'false', '1', '0', 'yes', 'no']).transform((v) => v === 'true' || v === '1' || v === 'yes');

const int = (min: number, max: number) =>
  // A function, not a string: a schema-level string would also replace the min/max messages.
  z.coerce
    .number({ error: (iss) => (iss.code === 'invalid_type' ? 'must be a whole number' : undefined) })
    .int('must be a whole number')
    .min(min)
    .max(max);

const ENDPOINT_MESSAGE = 'must be http://host:port, https://host:port or host:port, without a path or credentials';

const SEVEN_DAYS_S = 7 * 24 * 3600;

const MODEL_NAME_MESSAGE = 'must be a model name: letters, digits, ".", "_" and "-", starting with a letter or digit, at most 64';

const modelList = z
  .string()
  .transform((v) =>
    v
      .split(',')
      .map((x) => x.trim())
      .filter(Boolean),
  )
  .refine(
    (names) => names.every((n) => MODEL_NAME_PATTERN.test(n)),
    `must be model names separated by commas (each ${MODEL_NAME_MESSAGE.replace('must be a model name: ', '')})`,
  );

export const envSchema = z.object({
  // --- Postgres
  /** postgresql://user:password@host:5432/db */
  DATABASE_URL: z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgresql:// URL'),
  /** Connections per process. */
  DATABASE_POOL_MAX: int(1, 200).default(10),

  // --- Redis / BullMQ
  /** Redis holding the BullMQ queue; it must never evict keys (maxmemory-policy noeviction). */
  REDIS_URL: z
    .string()
    .regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL')
    .default('redis://127.0.0.1:6379'),
  /** BullMQ queue name; every API and worker of one deployment must agree on it. Each model has its own queue, QUEUE_NAME.MODEL. */
  QUEUE_NAME: z
    .string()
    .regex(/^[A-Za-z0-9_-]{1,64}$/, 'letters, digits, _ and - only')
    .default('generate-image'),
  /** Attempts per job before it is failed for good (transient faults only; bad input fails at once). */
  JOB_ATTEMPTS: int(1, 20).default(3),
  /** First retry delay; doubles on each further attempt. */
  JOB_BACKOFF_MS: int(0, 3_600_000).default(5_000),
  /** Worker lock time on an active job (renewed at half of it); a dead worker's job is taken over after about this long. */
  JOB_LOCK_MS: int(1_000, 600_000).default(30_000),
  /** How often workers look for jobs whose lock expired. Must be the same on every worker. */
  JOB_STALLED_INTERVAL_MS: int(500, 600_000).default(15_000),
  /** Times a job may lose its worker (crash, lock expired) before it is failed for good. */
  JOB_MAX_STALLS: int(1, 20).default(3),
  /** Waiting jobs of one model past which POST /generated-images answers 503 with Retry-After for that model; 0 = no limit. */
  MAX_QUEUE_DEPTH: int(0, 10_000_000).default(10_000),
  /**
   * Largest compute one request may ask for, in pixel-steps (width x height x num_steps); larger
   * requests get 400. Default 52,428,800 = 1024x1024 at 50 steps (512x512 at 50 steps is 13,107,200).
   */
  MAX_PIXEL_STEPS: int(64 * 64, 2048 * 2048 * 150).default(1024 * 1024 * 50),
  /** Longest one attempt may run (generation and upload); past it the attempt fails as timed_out and is retried. */
  JOB_TIMEOUT_MS: int(1_000, 86_400_000).default(600_000),
  /** Completed BullMQ jobs kept in Redis (the job row in Postgres is the record). */
  JOB_KEEP_COMPLETED: int(0, 1_000_000).default(1_000),
  /** Failed BullMQ jobs kept in Redis, for inspection. */
  JOB_KEEP_FAILED: int(0, 1_000_000).default(10_000),

  // --- S3 storage (the textbook's names)
  /** http(s)://host:port of the S3 API as the services reach it; a bare host:port means http. */
  STORAGE_ENDPOINT: z.string().min(1).refine(isEndpoint, ENDPOINT_MESSAGE),
  /** The endpoint presigned URLs are made for, when users reach storage at another address. */
  STORAGE_PUBLIC_ENDPOINT: z.string().min(1).refine(isEndpoint, ENDPOINT_MESSAGE).optional(),
  /** Access key of the S3 credentials; never logged. */
  STORAGE_ACCESS_KEY: z.string().min(1),
  /** Secret key of the S3 credentials; never logged. */
  STORAGE_SECRET_KEY: z.string().min(1),
  /** Bucket for generated images; created, private, at startup when missing. */
  STORAGE_BUCKET: z
    .string()
    .regex(/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/, 'must be a valid S3 bucket name')
    .default('t2i-images'),
  /** Region the S3 server expects in signatures (MinIO and most local servers: us-east-1). */
  STORAGE_REGION: z.string().min(1).default('us-east-1'),
  /** Lifetime of presigned image URLs, in seconds (default 1 hour): anyone holding a URL can fetch the image until then. At most 7 days (S3's limit). */
  PRESIGN_TTL_SECONDS: int(1, SEVEN_DAYS_S).default(3600),

  // --- API
  /** Address the API listens on; 0.0.0.0 inside a container. */
  HOST: z.string().min(1).default('127.0.0.1'),
  /** Port the API listens on. */
  PORT: int(0, 65535).default(8000),
  /** Largest accepted request body. */
  BODY_LIMIT_BYTES: int(1_024, 10_485_760).default(65_536),
  /** Largest input picture or mask a multipart POST /generated-images may upload, per file (a 2048x2048 PNG photo is about 8 MB). */
  MAX_UPLOAD_BYTES: int(1_024, 67_108_864).default(16_777_216),
  /**
   * Models accepted while no worker serves them (scaled to zero, or restarting), comma-separated:
   * their jobs wait in their queue instead of being refused. Other models must be served.
   */
  KNOWN_MODELS: modelList.optional(),
  /** The model of requests that name none; unset: the only model served or known, when there is exactly one. */
  DEFAULT_MODEL: z.string().regex(MODEL_NAME_PATTERN, MODEL_NAME_MESSAGE).optional(),
  /**
   * required: every request to /generated-images and /usage needs an API key (`t2i keys create`).
   * off: no keys, everyone is the tenant "anonymous"; the API refuses to start so unless HOST is a loopback address.
   */
  AUTH: z.enum(['required', 'off']).default('required'),
  /** Browser origins allowed to call the API (CORS), comma-separated, e.g. https://app.example.com; CORS is off when unset. */
  CORS_ORIGINS: z
    .string()
    .transform((v) => v.split(',').map((o) => o.trim()))
    .pipe(z.array(z.string().regex(/^https?:\/\/[^/\s,*]+$/, 'must be origins such as https://app.example.com, comma-separated (no path, no *)')))
    .optional(),
  /** Folder of the built web page the API serves at / (npm run build makes dist/web, found beside the code when unset). */
  WEB_DIR: z.string().min(1).optional(),
  /**
   * Which proxies to believe about the client's address (X-Forwarded-For), for rate limits and
   * logs: false (none, the default), a number of hops, or the proxies' addresses or CIDRs,
   * comma-separated. true believes anyone, so clients could pick their own address: avoid it.
   */
  TRUST_PROXY: z
    .string()
    .default('false')
    .refine(isTrustProxy, 'must be true, false, a number of hops, or IP addresses / CIDRs separated by commas')
    .transform(parseTrustProxy),

  // --- Rate limits and quotas
  /** Requests per API key per RATE_LIMIT_WINDOW_MS, counted in Redis across every API process; 0 = no limit. */
  RATE_LIMIT_MAX: int(0, 10_000_000).default(600),
  /** The rate limit's window. */
  RATE_LIMIT_WINDOW_MS: int(1_000, 86_400_000).default(60_000),
  /** Failed authentications (missing, malformed, unknown or revoked keys) per client address per AUTH_FAILURE_WINDOW_MS; past it, every request from the address that needs a key gets 429 until the window ends. */
  AUTH_FAILURE_LIMIT: int(1, 10_000_000).default(30),
  /** The window of AUTH_FAILURE_LIMIT. */
  AUTH_FAILURE_WINDOW_MS: int(1_000, 86_400_000).default(600_000),
  /** Jobs a tenant may have queued or running at once; 0 = no limit. A tenant's own limit (`t2i tenants set`) wins. */
  TENANT_MAX_IN_FLIGHT: int(0, 10_000_000).default(100),
  /**
   * Compute a tenant may ask for per UTC day, in pixel-steps (width x height x num_steps); 0 = no
   * limit. Default 13,107,200,000 = 1,000 images of 512x512 at 50 steps. A tenant's own limit
   * (`t2i tenants set`) wins.
   */
  TENANT_DAILY_PIXEL_STEPS: int(0, 1e15).default(13_107_200_000),

  // --- Retention
  /** Finished jobs older than this many days lose their image objects and prompts (the row stays, for accounting); 0 = keep forever. */
  RETENTION_DAYS: int(0, 36_500).default(30),
  /** How often each worker runs the retention sweeper. */
  SWEEP_INTERVAL_MS: int(1_000, 86_400_000).default(3_600_000),

  // --- Live events (SSE and WebSocket)
  /** A job's event log in Redis (status, progress, previews) expires this long after its last event; the job row stays the record. */
  EVENTS_RETENTION_SECONDS: int(60, SEVEN_DAYS_S).default(3_600),
  /** Interval of heartbeats on event streams (SSE comment lines, WebSocket pings), so proxies keep quiet streams open. */
  EVENTS_HEARTBEAT_MS: int(100, 300_000).default(15_000),
  /** Shortest interval between two live previews of a job (500 = at most 2 per second); 0 turns previews off. */
  PREVIEW_INTERVAL_MS: int(0, 60_000)
    .refine((v) => v === 0 || v >= 500, 'must be 0 (off) or at least 500 (previews are sent at most twice a second)')
    .default(500),

  // --- OpenAI-compatible API
  /** How long POST /v1/images/generations waits for its images before answering 504 (the job goes on; its id is in the answer). */
  OPENAI_WAIT_MS: int(1_000, 3_600_000).default(300_000),

  // --- Webhooks
  /**
   * Secret webhooks are signed with (Standard Webhooks: "whsec_" and base64 of at least 24 random
   * bytes; make one with `openssl rand -base64 32`); receivers verify with it. Never logged.
   * Unset: this server sends no webhooks, and jobs that ask for one are refused.
   */
  WEBHOOK_SECRET: z
    .string()
    .regex(/^whsec_[A-Za-z0-9+/]{32,}={0,2}$/, 'must be whsec_ followed by base64 of at least 24 bytes')
    .optional(),
  /**
   * Destinations webhooks may reach although they are loopback, private or otherwise refused:
   * host names, IP addresses or CIDR ranges, comma-separated (for private deployments and tests).
   */
  WEBHOOK_ALLOWED_HOSTS: z
    .string()
    .default('')
    .transform((v) =>
      v
        .split(',')
        .map((x) => x.trim())
        .filter(Boolean),
    )
    .refine(isAllowlist, 'must be host names, IP addresses or CIDR ranges, comma-separated'),
  /** DNS servers (host:port, comma-separated) webhook hosts are resolved with; the system resolver when unset. */
  WEBHOOK_DNS_SERVERS: z
    .string()
    .regex(/^[^,\s]+(,[^,\s]+)*$/, 'must be host:port entries separated by commas')
    .transform((v) => v.split(','))
    .optional(),
  /** Longest one webhook attempt may take (connect, send, read at most 64 KiB of the answer). */
  WEBHOOK_TIMEOUT_MS: int(100, 60_000).default(10_000),
  /** Attempts per webhook before it is given up. */
  WEBHOOK_MAX_ATTEMPTS: int(1, 30).default(8),
  /** Wait after a failed webhook attempt; doubled after each further one, at most 6 hours. */
  WEBHOOK_BACKOFF_MS: int(10, 3_600_000).default(5_000),
  /** How often each worker looks for webhooks that are due. */
  WEBHOOK_POLL_MS: int(50, 60_000).default(1_000),

  // --- Worker
  /** A Stable Diffusion ONNX export (diffusers/optimum layout). */
  MODEL_DIR: z.string().min(1).optional(),
  /** The name this worker serves its model under (requests' `model`, its queue, metrics); the export's folder name when unset. */
  MODEL_NAME: z.string().regex(MODEL_NAME_PATTERN, MODEL_NAME_MESSAGE).optional(),
  /** onnxruntime execution provider; auto takes the first available of cuda, coreml and cpu. */
  EXECUTION_PROVIDER: z.enum(['auto', 'cuda', 'coreml', 'cpu']).default('auto'),
  /** onnxruntime intra-op threads; its default (all cores) when unset. */
  ORT_THREADS: int(1, 256).optional(),
  /**
   * Most generations one UNet run takes at once (same size, steps, scheduler and guidance on or off;
   * each image of a job of num_images counts); 1 runs one at a time, a job's images one after another.
   * A worker then holds up to twice this many jobs, so the next batch is ready while the last
   * one's images are stored. `npm run bench` measured no gain on CPU, hence 1; on a GPU see
   * docs/performance.md.
   */
  BATCH_MAX: int(1, 64).default(1),
  /** Longest the first job in line waits for others to share its batch, counted from its arrival at the engine. */
  BATCH_WAIT_MS: int(0, 10_000).default(20),
  /**
   * Sessions of the model in one worker, each in its own thread with its own copy of the model;
   * each gets an equal share of the cores unless ORT_THREADS says otherwise. On a CPU worker with
   * the memory for it, 2 sessions of 1 thread do more work per CPU second than 1 of 2 threads.
   */
  ENGINE_SESSIONS: int(1, 16).default(1),
  /** Port of the worker's Prometheus /metrics endpoint. */
  WORKER_METRICS_PORT: int(0, 65535).default(9191),
  /** Address the worker's metrics endpoint listens on; 0.0.0.0 inside a container. */
  WORKER_METRICS_HOST: z.string().min(1).default('127.0.0.1'),
  /** Shortest interval between progress writes to Postgres while a job runs. */
  PROGRESS_INTERVAL_MS: int(0, 60_000).default(500),
  /** Name of this worker in job rows and logs; hostname:pid when unset. */
  WORKER_ID: z.string().min(1).max(200).optional(),
  /**
   * A generation that makes no progress for this long is hung: the worker stops taking jobs,
   * hands the job back and restarts its engine. Must exceed the slowest of (prompt encoding plus
   * one step), one step, and decoding on this hardware, for a full batch (BATCH_MAX generations).
   */
  ENGINE_STALL_MS: int(1_000, 3_600_000).default(180_000),
  /** Consecutive engine restarts (thread died or hung) before the worker exits with code 1 for its supervisor to replace it. */
  ENGINE_MAX_RESTARTS: int(0, 100).default(3),
  /** Wait before the first engine restart; doubled for each consecutive one. */
  ENGINE_RESTART_BACKOFF_MS: int(0, 600_000).default(1_000),
  /** On SIGTERM, how long a worker lets its current job finish before handing it back to the queue. */
  SHUTDOWN_GRACE_MS: int(0, 3_600_000).default(30_000),
  /** How often each worker reconciles job rows with the queue (re-enqueues lost jobs, fails dead ones). */
  RECONCILE_INTERVAL_MS: int(1_000, 3_600_000).default(30_000),
  /** A queued row unchanged this long is checked against the queue by the reconciler. */
  RECONCILE_QUEUED_AFTER_MS: int(1_000, 86_400_000).default(60_000),

  // --- Model from the object store
  /** s3://bucket/prefix/ of an export uploaded with `t2i models push`; the worker syncs it into MODEL_CACHE_DIR at boot, verified, and loads it instead of MODEL_DIR. Same endpoint and credentials as STORAGE_*. */
  MODEL_URI: z
    .string()
    .regex(/^s3:\/\/[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](\/.*)?$/, 'must be s3://bucket/prefix/')
    .optional(),
  /** Folder of synced exports, one subfolder per manifest; a second worker on the host, or a restart, reuses it. */
  MODEL_CACHE_DIR: z.string().min(1).default('.t2i/model-cache'),

  // --- Logs
  /** pino log level. */
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /** Human-readable logs instead of JSON lines; when unset, pretty only if stdout is a terminal. */
  LOG_PRETTY: bool.optional(),
  /** Also write JSON lines to this file (rotated, see below); stdout only when unset. */
  LOG_FILE: z.string().min(1).optional(),
  /** Level of the file sink; LOG_LEVEL when unset (e.g. warn on stdout, debug in the file). */
  LOG_FILE_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).optional(),
  /** Rotate the log file when it reaches this size: a number with k, m or g (megabytes when bare). */
  LOG_FILE_MAX_SIZE: z
    .string()
    .regex(/^\d+[kmg]?$/i, 'must be a size such as 500k, 100m or 1g')
    .default('100m'),
  /** Also rotate the log file daily or hourly, or only by size (none). */
  LOG_FILE_FREQUENCY: z.enum(['daily', 'hourly', 'none']).default('daily'),
  /** Rotated log files kept besides the current one; older ones are deleted. */
  LOG_FILE_RETENTION: int(1, 10_000).default(14),

  // --- Metrics and error reporting
  /** Bearer token Prometheus must send to GET /metrics: without it the API serves no /metrics, and the worker's (on its internal port) is open. */
  METRICS_TOKEN: z.string().min(16, 'must be at least 16 characters').optional(),
  /** Sentry DSN; errors are reported only when set. */
  SENTRY_DSN: z.string().url('must be a Sentry DSN URL').optional(),
  /** Environment name on Sentry events (production, staging, ...). */
  SENTRY_ENVIRONMENT: z.string().min(1).default('production'),
  /** Release name on Sentry events; t2i@<package version> when unset. */
  SENTRY_RELEASE: z.string().min(1).optional(),
});

export type Config = z.infer<typeof envSchema>;

export class ConfigError extends Error {
  override name = 'ConfigError';
  constructor(readonly issues: string[]) {
    super(`invalid configuration:\n${issues.map((i) => `  - ${i}`).join('\n')}`);
  }
}

export type Role = 'api' | 'worker' | 'any';

/** Parses the environment; throws a ConfigError listing every invalid or missing variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, role: Role = 'any'): Config {
  // Empty strings mean "unset", as in most .env tooling. Whitespace-only counts as empty too:
  // z.coerce.number() would otherwise read PORT="  " as port 0.
  const cleaned = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v.trim() !== ''));
  const result = envSchema.safeParse(cleaned);
  // "required" only when the variable is absent: zod 4 issues carry no `input` unless asked to,
  // so testing i.input called every bad value (PORT=abc) "required". Values are never echoed,
  // since some are secrets.
  const issues = result.success
    ? []
    : result.error.issues.map((i) => {
        const name = String(i.path[0] ?? '');
        return `${i.path.join('.')}: ${i.code === 'invalid_type' && cleaned[name] === undefined ? 'required' : i.message}`;
      });
  // Checked even when other variables are invalid, so the worker's list is complete too.
  if (role === 'worker' && cleaned.MODEL_DIR === undefined && cleaned.MODEL_URI === undefined) {
    issues.push('MODEL_DIR: required by the worker (or MODEL_URI, a model export in S3)');
  }
  // Secure by default: an API without keys must not be reachable from other machines.
  if (role === 'api' && result.success && result.data.AUTH === 'off' && !isLoopbackHost(result.data.HOST)) {
    issues.push(
      `AUTH: "off" is only allowed when HOST is a loopback address (127.0.0.1, ::1, localhost), not "${result.data.HOST}"; create API keys with \`t2i keys create\` instead`,
    );
  }
  if (issues.length > 0) throw new ConfigError(issues);
  return result.data!;
}

/**
 * Host, port and TLS of an S3 endpoint given as a URL or a bare host:port. Throws on anything
 * else rather than guessing: a path, query or user:password in the URL would be silently dropped
 * (the S3 client takes host and port only), so it is refused. Errors never echo credentials.
 */
export function parseEndpoint(endpoint: string): { host: string; port: number; useSSL: boolean; url: string } {
  const text = endpoint.trim();
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(text)?.[1]?.toLowerCase();
  if (scheme !== undefined && scheme !== 'http' && scheme !== 'https') {
    throw new Error(`S3 endpoint: scheme "${scheme}://" is not supported; use http://host:port, https://host:port or host:port`);
  }
  let url: URL;
  try {
    url = new URL(scheme ? text : `http://${text}`);
  } catch {
    throw new Error('S3 endpoint: not a valid http(s)://host:port or host:port');
  }
  if (url.username || url.password) {
    throw new Error(`S3 endpoint ${url.host}: remove the user:password part; credentials go in STORAGE_ACCESS_KEY and STORAGE_SECRET_KEY`);
  }
  if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
    throw new Error(`S3 endpoint ${url.host}: must not have a path or query (got "${url.pathname}${url.search}"); give only http(s)://host:port`);
  }
  const useSSL = url.protocol === 'https:';
  const port = url.port ? Number(url.port) : useSSL ? 443 : 80;
  return { host: url.hostname, port, useSSL, url: `${url.protocol}//${url.host}` };
}

function isAllowlist(entries: string[]): boolean {
  try {
    new HostAllowlist(entries);
    return true;
  } catch {
    return false;
  }
}

/** Fastify's trustProxy: false, true, a hop count, or the addresses of trusted proxies. */
export type TrustProxy = boolean | number | string[];

function parseTrustProxy(v: string): TrustProxy {
  const t = v.trim().toLowerCase();
  if (t === 'false') return false;
  if (t === 'true') return true;
  if (/^\d+$/.test(t)) return Number(t);
  return t.split(',').map((x) => x.trim());
}

function isTrustProxy(v: string): boolean {
  const t = v.trim().toLowerCase();
  if (t === 'false' || t === 'true' || /^\d{1,2}$/.test(t)) return true;
  return t.split(',').every((entry) => {
    const [addr, bits, ...rest] = entry.trim().split('/');
    const family = isIP(addr ?? '');
    if (family === 0 || rest.length > 0) return false;
    return bits === undefined || (/^\d{1,3}$/.test(bits) && Number(bits) <= (family === 4 ? 32 : 128));
  });
}

/** True for addresses only this machine can reach: 127.0.0.0/8, ::1 and localhost. */
export function isLoopbackHost(host: string): boolean {
  const h = host
    .trim()
    .toLowerCase()
    .replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) || h === '::ffff:127.0.0.1';
}

function isEndpoint(v: string): boolean {
  try {
    parseEndpoint(v);
    return true;
  } catch {
    return false;
  }
}
