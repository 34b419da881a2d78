import { pino, type Logger } from 'pino';

/**
 * One logger configuration for every process: JSON lines when stdout is not a terminal,
 * readable lines when it is (or LOG_PRETTY says so). Secrets never reach a line: the paths
 * below are redacted wherever they appear.
 */

export type { Logger };

export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'headers.authorization',
  '*.secretKey',
  '*.accessKey',
  '*.STORAGE_SECRET_KEY',
  '*.STORAGE_ACCESS_KEY',
  '*.password',
  'url',
  '*.url',
];

export function createLogger(opts: { level: string; pretty?: boolean | undefined; name: string }): Logger {
  const pretty = opts.pretty ?? process.stdout.isTTY === true;
  return pino({
    name: opts.name,
    level: opts.level,
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    ...(pretty ? { transport: { target: 'pino-pretty', options: { colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } } } : {}),
  });
}
