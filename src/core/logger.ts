import { pino, type DestinationStream, type Level, type Logger, type StreamEntry } from 'pino';
import PinoPretty from 'pino-pretty';
import type { Config } from '../config.js';
import { redactApiKeys } from './api-keys.js';

/**
 * One logger configuration for every process: JSON lines when stdout is not a terminal,
 * readable lines when it is (or LOG_PRETTY says so), and optionally a rotating JSON file
 * alongside (LOG_FILE). Secrets never reach a line: known secret paths are redacted, the
 * literal values of the storage keys and the signature of any presigned URL are blanked in
 * the written line itself, and prompts are kept out of every line above debug.
 */

export type { Logger };
export type LogLevel = Level | 'silent';

/** Object paths pino blanks wherever they appear (one level of nesting for the wildcards). */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["x-api-key"]',
  'headers.authorization',
  'headers.cookie',
  '*.headers.authorization',
  '*.headers.cookie',
  'authorization',
  '*.authorization',
  'secretKey',
  'accessKey',
  '*.secretKey',
  '*.accessKey',
  'STORAGE_SECRET_KEY',
  'STORAGE_ACCESS_KEY',
  '*.STORAGE_SECRET_KEY',
  '*.STORAGE_ACCESS_KEY',
  'METRICS_TOKEN',
  '*.METRICS_TOKEN',
  'WEBHOOK_SECRET',
  '*.WEBHOOK_SECRET',
  'SENTRY_DSN',
  '*.SENTRY_DSN',
  'password',
  '*.password',
];

export const REDACTED = '[redacted]';

/** Query parameters of SigV4 presigned URLs that would let a reader fetch the object or learn the key id. */
const SIGNED_QUERY = /([?&](?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=)[^&"\s\\]*/gi;

/** Keys whose values are user prompts: logged at debug level only. */
const PROMPT_KEYS = ['prompt', 'negativePrompt', 'negative_prompt'];
const DEBUG = 20;

/**
 * Blanks secrets in a text: presigned URL signatures and credentials, the secret of any API key,
 * and every literal secret given (as written, JSON-escaped, and URL-encoded). Used on log lines and on error reports.
 */
export function scrubSecrets(text: string, secrets: readonly string[] = []): string {
  // An API key a client put in the wrong place (a query string, a path) keeps only its public prefix.
  let out = redactApiKeys(text.replace(SIGNED_QUERY, `$1${REDACTED}`), REDACTED);
  for (const secret of secrets) {
    // Short values would blank ordinary words: only secrets of some length are searched for.
    if (secret.length < 6) continue;
    for (const form of new Set([secret, JSON.stringify(secret).slice(1, -1), encodeURIComponent(secret)])) {
      out = out.split(form).join(REDACTED);
    }
  }
  return out;
}

export interface LoggerOptions {
  name: string;
  level: LogLevel;
  /** Readable lines instead of JSON; when unset, readable only if stdout is a terminal. */
  pretty?: boolean | undefined;
  /** A further sink (the rotating log file), with its own level. */
  file?: { stream: DestinationStream; level: Level } | undefined;
  /** Literal values (storage keys, tokens) blanked wherever they appear in a line. */
  secrets?: readonly string[] | undefined;
  /** Where lines go instead of stdout (tests capture them). */
  destination?: DestinationStream | undefined;
}

const LEVEL_VALUES: Record<LogLevel, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

export function createLogger(opts: LoggerOptions): Logger {
  const pretty = opts.pretty ?? process.stdout.isTTY === true;
  const secrets = (opts.secrets ?? []).filter((s) => s.length > 0);
  // Synchronous stdout, as pino's default: a crashing process still gets its last lines out.
  const main: DestinationStream = pretty
    ? PinoPretty({
        colorize: opts.destination === undefined,
        translateTime: 'SYS:HH:MM:ss.l',
        ignore: 'pid,hostname',
        destination: opts.destination ?? 1,
        sync: true,
      })
    : (opts.destination ?? pino.destination({ dest: 1, sync: true }));

  const streams: StreamEntry[] = [];
  if (opts.level !== 'silent') streams.push({ level: opts.level, stream: main });
  if (opts.file) streams.push({ level: opts.file.level, stream: opts.file.stream });
  const levels = streams.map((s) => LEVEL_VALUES[s.level ?? 'info']);
  const lowest = levels.length === 0 ? 'silent' : (Object.entries(LEVEL_VALUES).find(([, v]) => v === Math.min(...levels))![0] as LogLevel);

  return pino(
    {
      name: opts.name,
      level: lowest,
      redact: { paths: REDACT_PATHS, censor: REDACTED },
      hooks: {
        // Prompts are user data: above debug they are replaced, whoever logs them.
        logMethod(args, method, level) {
          const first = args[0];
          if (level > DEBUG && typeof first === 'object' && first !== null && PROMPT_KEYS.some((k) => k in first)) {
            const copy: Record<string, unknown> = { ...(first as Record<string, unknown>) };
            for (const k of PROMPT_KEYS) if (k in copy) copy[k] = '[debug level only]';
            args[0] = copy;
          }
          method.apply(this, args);
        },
        // The serialized line: catches presigned URLs and keys inside messages and error texts too.
        streamWrite: (line) => scrubSecrets(line, secrets),
      },
    },
    streams.length === 1 ? streams[0]!.stream : pino.multistream(streams),
  );
}

/** A size-and-time rotating file stream (pino-roll), creating the folder when missing. */
export async function openRotatingFile(opts: {
  path: string;
  maxSize: string;
  frequency: 'daily' | 'hourly' | 'none';
  retention: number;
}): Promise<DestinationStream> {
  const { default: roll } = await import('pino-roll');
  return roll({
    file: opts.path,
    size: opts.maxSize.toLowerCase(),
    ...(opts.frequency === 'none' ? {} : { frequency: opts.frequency, dateFormat: opts.frequency === 'daily' ? 'yyyy-MM-dd' : 'yyyy-MM-dd-HH' }),
    limit: { count: opts.retention },
    mkdir: true,
    symlink: true,
  });
}

/** The logger of a service process (api, worker) from its configuration. */
export async function createProcessLogger(config: Config, name: string, destination?: DestinationStream): Promise<Logger> {
  const file = config.LOG_FILE
    ? {
        stream: await openRotatingFile({
          path: config.LOG_FILE,
          maxSize: config.LOG_FILE_MAX_SIZE,
          frequency: config.LOG_FILE_FREQUENCY,
          retention: config.LOG_FILE_RETENTION,
        }),
        level: config.LOG_FILE_LEVEL ?? (config.LOG_LEVEL === 'silent' ? 'info' : config.LOG_LEVEL),
      }
    : undefined;
  return createLogger({
    name,
    level: config.LOG_LEVEL,
    pretty: config.LOG_PRETTY,
    file,
    secrets: [config.STORAGE_SECRET_KEY, config.STORAGE_ACCESS_KEY, config.METRICS_TOKEN ?? '', config.WEBHOOK_SECRET ?? ''],
    destination,
  });
}
