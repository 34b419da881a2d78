import { parseArgs } from 'node:util';
import { createAccountsRepo } from '../adapters/accounts-repo.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { ConfigError, loadConfig } from '../config.js';
import { AccountsService, type ApiKeyInfo } from '../core/accounts.js';
import { parsePrefix } from '../core/api-keys.js';
import { UsageError } from './engine-commands.js';

/**
 * `t2i keys create --tenant NAME [--name LABEL] [--json]`, `t2i keys list [--tenant NAME] [--json]`,
 * `t2i keys revoke PREFIX`: API keys in the database at DATABASE_URL. A key is printed once, at
 * creation; the database keeps only its hash, so a lost key is revoked and replaced, not recovered.
 */

const TENANT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

function iso(d: Date | null): string {
  return d ? d.toISOString().replace(/\.\d{3}Z$/, 'Z') : '-';
}

function keyJson(k: ApiKeyInfo) {
  return {
    prefix: k.prefix,
    tenant: k.tenantName,
    name: k.name,
    created_at: k.createdAt.toISOString(),
    last_used_at: k.lastUsedAt?.toISOString() ?? null,
    revoked_at: k.revokedAt?.toISOString() ?? null,
  };
}

export async function keysCommand(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { tenant: { type: 'string' }, name: { type: 'string' }, json: { type: 'boolean', default: false } },
  });
  if (sub !== 'create' && sub !== 'list' && sub !== 'revoke') {
    throw new UsageError('use `t2i keys create --tenant NAME [--name LABEL]`, `t2i keys list [--tenant NAME]` or `t2i keys revoke PREFIX`');
  }
  if (values.tenant !== undefined && !TENANT_NAME.test(values.tenant)) {
    throw new UsageError(`--tenant must be 1-63 letters, digits, ".", "_" or "-", starting with a letter or digit; got "${values.tenant}"`);
  }
  if (values.name !== undefined && (values.name.length > 100 || /[\p{Cc}]/u.test(values.name))) {
    throw new UsageError('--name must be at most 100 characters, without control characters');
  }
  let config;
  try {
    config = loadConfig(process.env, 'any');
  } catch (err) {
    if (err instanceof ConfigError) throw new UsageError(`${err.message}\nSet these in the environment (see .env.example).`);
    throw err;
  }
  const db = createPrismaClient(config.DATABASE_URL, { poolMax: 1 });
  const accounts = new AccountsService(createAccountsRepo(db));
  const out = (s: string) => process.stdout.write(`${s}\n`);
  try {
    switch (sub) {
      case 'create': {
        if (!values.tenant) throw new UsageError('keys create needs --tenant NAME');
        if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
        const { key, info } = await accounts.createKey(values.tenant, values.name ?? null);
        if (values.json) {
          out(JSON.stringify({ key, ...keyJson(info) }));
        } else {
          out(`Created API key ${info.prefix} for tenant "${info.tenantName}"${info.name ? ` (${info.name})` : ''}:\n`);
          out(`  ${key}\n`);
          out('It is shown only now: store it somewhere safe (the server keeps only its hash).');
          out(`Send it as "Authorization: Bearer <key>"; revoke it with \`t2i keys revoke ${info.prefix}\`.`);
        }
        return 0;
      }
      case 'list': {
        if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
        const keys = await accounts.listKeys(values.tenant);
        if (values.json) {
          out(JSON.stringify(keys.map(keyJson)));
          return 0;
        }
        const rows = [
          ['PREFIX', 'TENANT', 'NAME', 'CREATED', 'LAST USED', 'REVOKED'],
          ...keys.map((k) => [k.prefix, k.tenantName, k.name ?? '-', iso(k.createdAt), iso(k.lastUsedAt), iso(k.revokedAt)]),
        ];
        const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
        for (const r of rows)
          out(
            r
              .map((c, i) => c.padEnd(widths[i]!))
              .join('  ')
              .trimEnd(),
          );
        return 0;
      }
      case 'revoke': {
        const prefix = positionals.length === 1 ? parsePrefix(positionals[0]!) : null;
        if (!prefix) throw new UsageError('keys revoke takes one key prefix: the 8 hex digits after "t2i_" (see `t2i keys list`)');
        const info = await accounts.revokeKey(prefix);
        if (!info) {
          process.stderr.write(`t2i keys revoke: no key has the prefix ${prefix}\n`);
          return 1;
        }
        out(values.json ? JSON.stringify(keyJson(info)) : `Revoked key ${info.prefix} of tenant "${info.tenantName}" (at ${iso(info.revokedAt)}).`);
        return 0;
      }
    }
  } finally {
    await db.$disconnect();
  }
}
