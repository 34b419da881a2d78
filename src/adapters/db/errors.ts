import { DependencyUnavailableError } from '../../core/errors.js';
import { asError } from '../translate.js';

/**
 * Postgres (through Prisma, @prisma/adapter-pg and node-postgres) errors that mean the database
 * cannot be reached right now: Prisma's connection codes, SQLSTATEs of a server shutting down or
 * starting, and the socket errors of node-postgres. Looked for along the `cause` chain.
 */
export function isDatabaseUnavailable(err: unknown): boolean {
  for (
    let e = err as { name?: string; code?: string; message?: string; cause?: unknown } | undefined, depth = 0;
    e && depth < 5;
    e = e.cause as typeof e, depth++
  ) {
    const code = String(e.code ?? '');
    const text = `${e.name ?? ''} ${e.message ?? ''}`;
    if (/^P(1001|1002|1008|1017|2024)$/.test(code) || /^57P0[1-3]$/.test(code)) return true;
    if (
      /DatabaseNotReachable|Can't reach database|Connection terminated|connection timeout|timeout exceeded when trying to connect|Query read timeout|terminating connection due to administrator command|the database system is (starting up|shutting down|in recovery mode)|Server has closed the connection|Connection ended unexpectedly|ConnectionClosed/i.test(
        text,
      )
    ) {
      return true;
    }
    if (/ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|EHOSTUNREACH|ENETUNREACH/.test(code + text)) return true;
  }
  return false;
}

/** The repository's translation at its seam: unreachable database -> DependencyUnavailableError. */
export function translateDbError(err: unknown): Error {
  return isDatabaseUnavailable(err) ? new DependencyUnavailableError('database', { cause: err }) : asError(err);
}
