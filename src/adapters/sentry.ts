import * as Sentry from '@sentry/node';
import { scrubSecrets } from '../core/logger.js';
import type { Config } from '../config.js';
import { noReporter, packageVersion, type ErrorReporter, type ReportContext } from '../core/reporting.js';

/**
 * Sentry: the only module that imports @sentry/node. Each reporter has its own client and scope
 * instead of the SDK's global one (Sentry.init), so an API and a worker in one process (tests,
 * the demo) report with their own settings, and nothing is instrumented behind our back: no
 * HTTP, console or database breadcrumbs, which would carry URLs and queries.
 */

export interface SentryOptions {
  dsn: string;
  release: string;
  environment: string;
  /** api or worker; a tag on every event. */
  component: string;
  /** Literal values (storage keys, tokens) that must never leave in an event. */
  secrets?: readonly string[];
}

const URL_IN_TEXT = /\bhttps?:\/\/[^\s"'<>]+/gi;

/** Strings of an event, recursively, with secrets, URLs and the given texts blanked. */
function scrubValue(value: unknown, secrets: readonly string[], depth = 0): unknown {
  if (typeof value === 'string') return scrubSecrets(value, secrets).replace(URL_IN_TEXT, '[url]');
  if (depth > 12 || value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((v) => scrubValue(v, secrets, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = scrubValue(v, secrets, depth + 1);
  return out;
}

export function scrubEvent<E extends Sentry.Event>(event: E, secrets: readonly string[]): E {
  // Request data (headers with Authorization, query strings, bodies with prompts) never leaves.
  delete event.request;
  delete event.breadcrumbs;
  delete event.user;
  const { exception, message, extra, tags, contexts } = event;
  return {
    ...event,
    ...(exception ? { exception: scrubValue(exception, secrets) as Sentry.Event['exception'] } : {}),
    ...(message ? { message: scrubValue(message, secrets) as string } : {}),
    ...(extra ? { extra: scrubValue(extra, secrets) as Record<string, unknown> } : {}),
    ...(tags ? { tags: scrubValue(tags, secrets) as Sentry.Event['tags'] } : {}),
    ...(contexts ? { contexts: scrubValue(contexts, secrets) as Sentry.Event['contexts'] } : {}),
  };
}

export function createSentryReporter(opts: SentryOptions): ErrorReporter {
  const secrets = (opts.secrets ?? []).filter((s) => s.length > 0);
  const client = new Sentry.NodeClient({
    dsn: opts.dsn,
    release: opts.release,
    environment: opts.environment,
    transport: Sentry.makeNodeTransport,
    stackParser: Sentry.defaultStackParser,
    // No dedupe: it drops an event identical to the previous one, and a job's final failure
    // often repeats its retried attempt's error word for word. Sentry groups them into one issue.
    integrations: [Sentry.linkedErrorsIntegration()],
    sendClientReports: false,
    maxBreadcrumbs: 0,
    beforeSend: (event) => scrubEvent(event, secrets),
  });
  const scope = new Sentry.Scope();
  scope.setClient(client);
  scope.setTag('component', opts.component);
  client.init();

  return {
    enabled: true,
    capture(err: unknown, ctx: ReportContext = {}) {
      const s = scope.clone();
      for (const [k, v] of Object.entries(ctx.tags ?? {})) if (v !== undefined) s.setTag(k, v);
      if (ctx.extra) s.setExtras(ctx.extra);
      if (ctx.level) s.setLevel(ctx.level);
      const redact = (ctx.redact ?? []).filter((t) => t.length > 0);
      // This report's own texts (a job's prompt), on top of the process-wide secrets in beforeSend.
      if (redact.length > 0) s.addEventProcessor((event) => scrubEvent(event, redact));
      s.captureException(err);
    },
    async flush(timeoutMs = 2000) {
      return client.flush(timeoutMs);
    },
    async close(timeoutMs = 2000) {
      await client.close(timeoutMs);
    },
  };
}

/** The process's reporter: Sentry when SENTRY_DSN is set, else one that does nothing. */
export function createErrorReporter(config: Config, component: 'api' | 'worker'): ErrorReporter {
  if (!config.SENTRY_DSN) return noReporter;
  return createSentryReporter({
    dsn: config.SENTRY_DSN,
    release: config.SENTRY_RELEASE ?? `t2i@${packageVersion()}`,
    environment: config.SENTRY_ENVIRONMENT,
    component,
    secrets: [config.STORAGE_SECRET_KEY, config.STORAGE_ACCESS_KEY, config.METRICS_TOKEN ?? '', config.WEBHOOK_SECRET ?? ''],
  });
}
