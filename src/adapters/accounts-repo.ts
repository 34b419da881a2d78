import type { AccountsRepo, ApiKeyInfo, Tenant } from '../core/accounts.js';
import { sqlPool, type Db } from './db/client.js';
import { translateDbError } from './db/errors.js';
import { translateErrors } from './translate.js';

/** The tenants and api_keys tables through Prisma. Key secrets are never passed here: only hashes. */

type KeyRow = {
  id: string;
  prefix: string;
  name: string | null;
  tenantId: string;
  createdAt: Date;
  lastUsedAt: Date | null;
  revokedAt: Date | null;
  webhookUrl: string | null;
  tenant: { name: string };
};

function toKey(r: KeyRow): ApiKeyInfo {
  return {
    id: r.id,
    prefix: r.prefix,
    name: r.name,
    tenantId: r.tenantId,
    tenantName: r.tenant.name,
    createdAt: r.createdAt,
    lastUsedAt: r.lastUsedAt,
    revokedAt: r.revokedAt,
    webhookUrl: r.webhookUrl,
  };
}

function toTenant(r: { id: string; name: string; maxInFlight: number | null; dailyPixelSteps: bigint | null }): Tenant {
  return { id: r.id, name: r.name, maxInFlight: r.maxInFlight, dailyPixelSteps: r.dailyPixelSteps === null ? null : Number(r.dailyPixelSteps) };
}

/** The key columns every read returns; never key_hash. */
const KEY_SELECT = {
  id: true,
  prefix: true,
  name: true,
  tenantId: true,
  createdAt: true,
  lastUsedAt: true,
  revokedAt: true,
  webhookUrl: true,
  tenant: { select: { name: true } },
} as const;

export function createAccountsRepo(db: Db): AccountsRepo {
  const repo: AccountsRepo = {
    async ensureTenant(name) {
      // upsert is one INSERT ... ON CONFLICT, so two processes creating the same tenant agree.
      return toTenant(await db.tenant.upsert({ where: { name }, create: { name }, update: {} }));
    },

    async insertKey({ tenantId, prefix, hash, name, webhookUrl = null }) {
      const rows = await db.$queryRaw<Array<{ id: string }>>`
        INSERT INTO api_keys (tenant_id, prefix, key_hash, name, webhook_url) VALUES (${tenantId}::uuid, ${prefix}, ${hash}, ${name}, ${webhookUrl})
        ON CONFLICT (prefix) DO NOTHING RETURNING id`;
      const id = rows[0]?.id;
      if (!id) return false;
      return toKey(await db.apiKey.findUniqueOrThrow({ where: { id }, select: KEY_SELECT }));
    },

    async keyByHash(hash) {
      // Every request asks this: one prepared statement on the client's own pool, not the query compiler.
      const { rows } = await sqlPool(db).query<{
        id: string;
        prefix: string;
        name: string | null;
        tenant_id: string;
        tenant_name: string;
        created_at: Date;
        last_used_at: Date | null;
        revoked_at: Date | null;
        webhook_url: string | null;
      }>({
        name: 't2i-key-by-hash',
        text: `SELECT k.id, k.prefix, k.name, k.tenant_id, t.name AS tenant_name, k.created_at, k.last_used_at, k.revoked_at, k.webhook_url
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = $1`,
        values: [hash],
      });
      const r = rows[0];
      return r
        ? toKey({
            id: r.id,
            prefix: r.prefix,
            name: r.name,
            tenantId: r.tenant_id,
            createdAt: r.created_at,
            lastUsedAt: r.last_used_at,
            revokedAt: r.revoked_at,
            webhookUrl: r.webhook_url,
            tenant: { name: r.tenant_name },
          })
        : null;
    },

    async listKeys(tenantName) {
      const rows = await db.apiKey.findMany({
        where: tenantName === undefined ? {} : { tenant: { name: tenantName } },
        orderBy: [{ createdAt: 'asc' }, { prefix: 'asc' }],
        select: KEY_SELECT,
      });
      return rows.map(toKey);
    },

    async revokeKey(prefix) {
      await db.apiKey.updateMany({ where: { prefix, revokedAt: null }, data: { revokedAt: new Date() } });
      const row = await db.apiKey.findUnique({ where: { prefix }, select: KEY_SELECT });
      return row ? toKey(row) : null;
    },

    async touchKey(id) {
      await db.apiKey.update({ where: { id }, data: { lastUsedAt: new Date() } });
    },

    async setTenantLimits(name, limits) {
      const data = {
        ...(limits.maxInFlight === undefined ? {} : { maxInFlight: limits.maxInFlight }),
        ...(limits.dailyPixelSteps === undefined ? {} : { dailyPixelSteps: limits.dailyPixelSteps === null ? null : BigInt(limits.dailyPixelSteps) }),
      };
      const r = await db.tenant.updateMany({ where: { name }, data });
      if (r.count === 0) return null;
      return toTenant(await db.tenant.findUniqueOrThrow({ where: { name } }));
    },

    async listTenants() {
      return (await db.tenant.findMany({ orderBy: { name: 'asc' } })).map(toTenant);
    },
  };
  return translateErrors(repo, translateDbError);
}
