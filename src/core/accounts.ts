import { generateApiKey, hashApiKey, parseApiKey } from './api-keys.js';

/**
 * Tenants and their API keys: creating, listing and revoking keys (`t2i keys`), and telling
 * who sent a request. Free of Prisma; the adapter in src/adapters/accounts-repo.ts implements
 * the port.
 */

export interface Tenant {
  id: string;
  name: string;
  /** Overrides of the configured quotas; null = the defaults. */
  maxInFlight: number | null;
  dailyPixelSteps: number | null;
}

export interface ApiKeyInfo {
  id: string;
  prefix: string;
  name: string | null;
  tenantId: string;
  tenantName: string;
  createdAt: Date;
  lastUsedAt: Date | null;
  revokedAt: Date | null;
  /** The key's default webhook URL, or null. */
  webhookUrl: string | null;
}

/** Who sent a request: the tenant everything it sees and does is scoped to, and the key it used. */
export interface Principal {
  tenantId: string;
  tenantName: string;
  /** Absent when authentication is off (AUTH=off): everyone is the anonymous tenant. */
  keyId?: string;
  keyPrefix?: string;
  /** Where jobs made with this key send their webhook when they name none. */
  webhookUrl?: string | null;
}

export interface AccountsRepo {
  /** The tenant of that name, created if missing. */
  ensureTenant(name: string): Promise<Tenant>;
  /** Stores a key's hash and prefix; false when the prefix is taken (the caller draws another). */
  insertKey(k: { tenantId: string; prefix: string; hash: string; name: string | null; webhookUrl?: string | null }): Promise<ApiKeyInfo | false>;
  /** The key with this hash, revoked or not; null when none has it. */
  keyByHash(hash: string): Promise<ApiKeyInfo | null>;
  listKeys(tenantName?: string): Promise<ApiKeyInfo[]>;
  /** Marks the key revoked (idempotent); null when no key has this prefix. */
  revokeKey(prefix: string): Promise<ApiKeyInfo | null>;
  touchKey(id: string): Promise<void>;
  /** Sets a tenant's own limits (null = back to the configured default); null when no tenant has that name. */
  setTenantLimits(name: string, limits: Partial<Pick<Tenant, 'maxInFlight' | 'dailyPixelSteps'>>): Promise<Tenant | null>;
  listTenants(): Promise<Tenant[]>;
}

/** Why a request was not authenticated; unknown and revoked keys look the same to the client. */
export type AuthFailure = 'missing' | 'malformed' | 'invalid';

export type AuthResult = { ok: true; principal: Principal } | { ok: false; reason: AuthFailure };

/** last_used_at is written at most this often per key, so reads do not each cost a write. */
const TOUCH_EVERY_MS = 60_000;

export class AccountsService {
  constructor(
    private readonly repo: AccountsRepo,
    private readonly log?: { warn(obj: object, msg: string): void },
  ) {}

  /**
   * Creates a key for the tenant (and the tenant if new). The returned `key` is the only copy.
   * `webhookUrl` is the key's default webhook (the caller checks it first).
   */
  async createKey(tenantName: string, name: string | null = null, webhookUrl: string | null = null): Promise<{ key: string; info: ApiKeyInfo }> {
    const tenant = await this.repo.ensureTenant(tenantName);
    // A random 32-bit prefix collides rarely; draw again when it does.
    for (let i = 0; i < 5; i++) {
      const k = generateApiKey();
      const info = await this.repo.insertKey({ tenantId: tenant.id, prefix: k.prefix, hash: k.hash, name, webhookUrl });
      if (info) return { key: k.key, info };
    }
    throw new Error('could not find a free key prefix after 5 tries');
  }

  listKeys(tenantName?: string): Promise<ApiKeyInfo[]> {
    return this.repo.listKeys(tenantName);
  }

  revokeKey(prefix: string): Promise<ApiKeyInfo | null> {
    return this.repo.revokeKey(prefix);
  }

  setTenantLimits(name: string, limits: Partial<Pick<Tenant, 'maxInFlight' | 'dailyPixelSteps'>>): Promise<Tenant | null> {
    return this.repo.setTenantLimits(name, limits);
  }

  listTenants(): Promise<Tenant[]> {
    return this.repo.listTenants();
  }

  /**
   * The principal an Authorization header stands for. Any well-formed key costs the same: its
   * hash is computed and looked up, found or not, so the time to answer does not depend on
   * whether its prefix exists (src/core/api-keys.ts).
   */
  async authenticate(authorization: string | undefined): Promise<AuthResult> {
    if (authorization === undefined || authorization === '') return { ok: false, reason: 'missing' };
    const m = /^Bearer ([^\s]+)$/i.exec(authorization);
    const parsed = m ? parseApiKey(m[1]!) : null;
    if (!parsed) return { ok: false, reason: 'malformed' };
    const key = await this.repo.keyByHash(hashApiKey(parsed.key));
    if (!key || key.revokedAt) return { ok: false, reason: 'invalid' };
    if (!key.lastUsedAt || Date.now() - key.lastUsedAt.getTime() > TOUCH_EVERY_MS) {
      // Bookkeeping only: a failed write must not fail the request.
      this.repo.touchKey(key.id).catch((err: unknown) => this.log?.warn({ err, keyPrefix: key.prefix }, 'could not record the key as used'));
    }
    return {
      ok: true,
      principal: { tenantId: key.tenantId, tenantName: key.tenantName, keyId: key.id, keyPrefix: key.prefix, webhookUrl: key.webhookUrl },
    };
  }

  /** The principal of every request when authentication is off. */
  async anonymous(): Promise<Principal> {
    const t = await this.repo.ensureTenant('anonymous');
    return { tenantId: t.id, tenantName: t.name };
  }
}
