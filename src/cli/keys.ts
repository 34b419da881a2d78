import { parseArgs } from 'node:util';
import { createAccountsRepo } from '../adapters/accounts-repo.js';
import { createPrismaClient } from '../adapters/db/client.js';
import { ConfigError, loadConfig } from '../config.js';
import { AccountsService, type ApiKeyInfo } from '../core/accounts.js';
import { parsePrefix } from '../core/api-keys.js';
import { UsageError } from './engine-commands.js';
import { webhookClientFromConfig } from '../adapters/webhook-http.js';
import { tenantSigningSecret } from '../core/webhooks.js';

/**
 * `t2i keys create --tenant NAME [--name LABEL] [--json]`, `t2i keys list [--tenant NAME] [--json]`,
 * `t2i keys revoke PREFIX`: API keys in the database at DATABASE_URL. `--webhook-url URL` gives a
 * key a default webhook for jobs that name none; `t2i keys webhook-secret --tenant NAME` prints the
 * secret the tenant's receivers verify webhooks with (derived from WEBHOOK_SECRET, stored nowhere). A key is printed once, at
 * creation; the database keeps only its hash, so a lost key is revoked and replaced, not recovered.
 *
 * `t2i tenants list [--json]`, `t2i tenants set NAME [--max-in-flight N|default]
 * [--daily-pixel-steps N|default]`: a tenant's own quotas, instead of TENANT_MAX_IN_FLIGHT and
 * TENANT_DAILY_PIXEL_STEPS (0 = no limit, as for those).
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
    webhook_url: k.webhookUrl,
  };
}

/** The service over the database at DATABASE_URL, closed after `fn`. */
async function withAccounts<T>(fn: (accounts: AccountsService) => Promise<T>): Promise<T> {
  let config;
  try {
    config = loadConfig(process.env, 'any');
  } catch (err) {
    if (err instanceof ConfigError) throw new UsageError(`${err.message}\nSet these in the environment (see .env.example).`);
    throw err;
  }
  const db = createPrismaClient(config.DATABASE_URL, { poolMax: 1 });
  try {
    return await fn(new AccountsService(createAccountsRepo(db)));
  } finally {
    await db.$disconnect();
  }
}

const out = (s: string) => process.stdout.write(`${s}\n`);

/** A key's default webhook is checked as a job's is (scheme, host, every address it resolves to). */
async function checkDefaultWebhook(url: string): Promise<void> {
  const config = loadConfig(process.env, 'any');
  if (!config.WEBHOOK_SECRET) throw new UsageError('--webhook-url needs WEBHOOK_SECRET: without it this deployment sends no webhooks');
  try {
    await webhookClientFromConfig(config, 't2i').check(url);
  } catch (err) {
    if ((err as Error).name === 'WebhookUrlError') throw new UsageError(`--webhook-url ${(err as Error).message}`);
    throw err;
  }
}

/** A limit as given on the command line: a whole number, or "default" (the configured one). */
function limitArg(name: string, v: string | undefined, max: number): number | null | undefined {
  if (v === undefined) return undefined;
  if (v === 'default') return null;
  if (!/^\d+$/.test(v) || Number(v) > max) throw new UsageError(`--${name} must be a whole number from 0 (no limit) to ${max}, or "default"; got "${v}"`);
  return Number(v);
}

export async function tenantsCommand(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { 'max-in-flight': { type: 'string' }, 'daily-pixel-steps': { type: 'string' }, json: { type: 'boolean', default: false } },
  });
  if (sub === 'list') {
    const tenants = await withAccounts((a) => a.listTenants());
    const show = (v: number | null) => (v === null ? 'default' : String(v));
    if (values.json) out(JSON.stringify(tenants.map((t) => ({ name: t.name, max_in_flight: t.maxInFlight, daily_pixel_steps: t.dailyPixelSteps }))));
    else for (const t of tenants) out(`${t.name}  max-in-flight ${show(t.maxInFlight)}  daily-pixel-steps ${show(t.dailyPixelSteps)}`);
    return 0;
  }
  if (sub !== 'set' || positionals.length !== 1) {
    throw new UsageError('use `t2i tenants list` or `t2i tenants set NAME [--max-in-flight N|default] [--daily-pixel-steps N|default]`');
  }
  const limits = {
    maxInFlight: limitArg('max-in-flight', values['max-in-flight'], 10_000_000),
    dailyPixelSteps: limitArg('daily-pixel-steps', values['daily-pixel-steps'], 1e15),
  };
  if (limits.maxInFlight === undefined && limits.dailyPixelSteps === undefined)
    throw new UsageError('tenants set needs --max-in-flight or --daily-pixel-steps');
  const name = positionals[0]!;
  const tenant = await withAccounts((a) =>
    a.setTenantLimits(name, {
      ...(limits.maxInFlight === undefined ? {} : { maxInFlight: limits.maxInFlight }),
      ...(limits.dailyPixelSteps === undefined ? {} : { dailyPixelSteps: limits.dailyPixelSteps }),
    }),
  );
  if (!tenant) {
    process.stderr.write(`t2i tenants set: no tenant is named "${name}" (tenants are made by \`t2i keys create --tenant NAME\`)\n`);
    return 1;
  }
  out(
    `Tenant "${tenant.name}": max-in-flight ${tenant.maxInFlight ?? 'default (TENANT_MAX_IN_FLIGHT)'}, daily-pixel-steps ${tenant.dailyPixelSteps ?? 'default (TENANT_DAILY_PIXEL_STEPS)'}.`,
  );
  return 0;
}

export async function keysCommand(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { tenant: { type: 'string' }, name: { type: 'string' }, 'webhook-url': { type: 'string' }, json: { type: 'boolean', default: false } },
  });
  if (sub !== 'create' && sub !== 'list' && sub !== 'revoke' && sub !== 'webhook-secret') {
    throw new UsageError(
      'use `t2i keys create --tenant NAME [--name LABEL] [--webhook-url URL]`, `t2i keys list [--tenant NAME]`, `t2i keys revoke PREFIX` or `t2i keys webhook-secret --tenant NAME`',
    );
  }
  if (values.tenant !== undefined && !TENANT_NAME.test(values.tenant)) {
    throw new UsageError(`--tenant must be 1-63 letters, digits, ".", "_" or "-", starting with a letter or digit; got "${values.tenant}"`);
  }
  if (values.name !== undefined && (values.name.length > 100 || /[\p{Cc}]/u.test(values.name))) {
    throw new UsageError('--name must be at most 100 characters, without control characters');
  }
  return withAccounts(async (accounts) => {
    switch (sub) {
      case 'create': {
        if (!values.tenant) throw new UsageError('keys create needs --tenant NAME');
        if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
        const webhookUrl = values['webhook-url'] ?? null;
        if (webhookUrl !== null) await checkDefaultWebhook(webhookUrl);
        const { key, info } = await accounts.createKey(values.tenant, values.name ?? null, webhookUrl);
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
      case 'webhook-secret': {
        // The tenant's webhook signing secret, for its receivers: derived from WEBHOOK_SECRET, stored nowhere.
        if (!values.tenant) throw new UsageError('keys webhook-secret needs --tenant NAME');
        const master = loadConfig(process.env, 'any').WEBHOOK_SECRET;
        if (!master) throw new UsageError('WEBHOOK_SECRET is not set: this deployment sends no webhooks');
        const tenant = (await accounts.listTenants()).find((t) => t.name === values.tenant);
        if (!tenant) throw new UsageError(`no tenant is named "${values.tenant}"`);
        out(tenantSigningSecret(master, tenant.id));
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
  });
}
