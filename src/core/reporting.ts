import { readFileSync } from 'node:fs';

/**
 * Error reporting as the services see it (src/adapters/sentry.ts implements it with Sentry).
 * Reports carry tags (job id, attempt, model, scheduler, route), never prompts, keys or URLs.
 */

export type ReportTags = Record<string, string | number | boolean | undefined>;

export interface ReportContext {
  tags?: ReportTags;
  /** Small, non-secret details (request id, status); scrubbed like everything else. */
  extra?: Record<string, unknown>;
  level?: 'fatal' | 'error' | 'warning';
  /** Texts that must not appear in the report (this job's prompt): blanked wherever found. */
  redact?: readonly string[];
}

export interface ErrorReporter {
  readonly enabled: boolean;
  capture(err: unknown, ctx?: ReportContext): void;
  /** Waits until queued reports are sent, or the timeout passes; false when some were not. */
  flush(timeoutMs?: number): Promise<boolean>;
  close(timeoutMs?: number): Promise<void>;
}

export const noReporter: ErrorReporter = {
  enabled: false,
  capture() {},
  flush: async () => true,
  close: async () => undefined,
};

/** The version in package.json, found from this file in the sources and in dist/ alike. */
export function packageVersion(): string {
  for (const up of ['../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(up, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 't2i' && pkg.version) return pkg.version;
    } catch {
      // not at this level
    }
  }
  return '0.0.0';
}

/**
 * Last resort for a process: an uncaught exception or unhandled rejection is logged, reported,
 * flushed (at most 2 s) and ends the process with code 1, as Node would have without handlers.
 */
export function exitOnUncaught(reporter: ErrorReporter, log: { fatal(obj: object, msg: string): void }): void {
  const die = (err: unknown, kind: string) => {
    log.fatal({ err }, kind);
    reporter.capture(err, { level: 'fatal', tags: { mechanism: kind } });
    void reporter.flush(2000).finally(() => process.exit(1));
  };
  process.on('uncaughtException', (err) => die(err, 'uncaught exception'));
  process.on('unhandledRejection', (reason) => die(reason, 'unhandled rejection'));
}
