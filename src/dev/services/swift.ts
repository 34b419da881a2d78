/**
 * OpenStack Swift with its S3 API (s3api + tempauth), standalone on loopback: a proxy and one
 * account, container and object server, their own memcached, one-replica rings, devices in the
 * services folder.
 * Chosen over Node S3 emulators because it really checks SigV4 signatures, expiry and anonymous
 * access, so presigned-URL tests mean something. Healthy about 3.5 s after start.
 */
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import * as Minio from 'minio';
import {
  freePort,
  INSTALL_HINT,
  readScript,
  requireExecutable,
  scriptPath,
  serverCommand,
  tail,
  waitReady,
  withPortRetry,
  type Placement,
  type Registry,
} from './process.js';

export interface S3Info {
  /** http://HOST:PORT (HOST is 127.0.0.1 by default), path-style (give the minio client `pathStyle: true`) */
  endpoint: string;
  port: number;
  accessKey: string;
  secretKey: string;
  region: string;
  /** proxy, account, container and object server, and memcached */
  pids: number[];
}

/** Swift's S3 API only accepts SigV4 scoped to the region its s3api filter is configured with. */
const S3_REGION = 'us-east-1';
/** Four Python servers on a loaded 2-core machine can take tens of seconds. */
const READY_TIMEOUT_MS = 60_000;
/** One healthcheck request's time limit (ms). */
const HEALTH_TIMEOUT_MS = 2_000;

const SWIFT_SERVERS = ['account', 'container', 'object'] as const;
type SwiftServer = (typeof SWIFT_SERVERS)[number];

interface SwiftSetup {
  /** The address every server listens on (and the rings point at). */
  host: string;
  swiftDir: string;
  devices: string;
  /** The OS user the servers run as (Swift drops privileges to it). */
  osUser: string;
  proxyPort: number;
  /** This run's own memcached, which the proxy caches tokens and account/container info in. */
  memcachePort: number;
  ports: Record<SwiftServer, number>;
  /** tempauth account and user: the S3 access key is `account:user`. */
  account: string;
  user: string;
  secret: string;
}

/** swift.conf and the four servers' paste configs, by file name. */
function swiftConfigs(o: SwiftSetup): Record<string, string> {
  const common = (port: number) => `[DEFAULT]
bind_ip = ${o.host}
bind_port = ${port}
workers = 0
user = ${o.osUser}
swift_dir = ${o.swiftDir}
devices = ${o.devices}
mount_check = false
disable_fallocate = true
log_level = INFO
`;
  const files: Record<string, string> = {
    'swift.conf': `[swift-hash]
swift_hash_path_suffix = t2i-local
swift_hash_path_prefix = t2i-local

[storage-policy:0]
name = Policy-0
default = yes
`,
  };
  for (const s of SWIFT_SERVERS) {
    files[`${s}-server.conf`] = `${common(o.ports[s])}
[pipeline:main]
pipeline = healthcheck ${s}-server

[app:${s}-server]
use = egg:swift#${s}

[filter:healthcheck]
use = egg:swift#healthcheck
`;
  }
  files['proxy-server.conf'] = `${common(o.proxyPort)}
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk t2i_anon_deny s3api tempauth copy slo dlo versioned_writes proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:s3api]
use = egg:swift#s3api
location = ${S3_REGION}

[filter:tempauth]
use = egg:swift#tempauth
user_${o.account}_${o.user} = ${o.secret} .admin

# This run's own memcached (never the default 11211, which could be a developer's, shared between
# runs). Without one every request re-validates its token and re-reads account and container
# info: a PUT took 15 ms at the median and 80 ms at p99 here, against 7 ms and 12 ms with it.
[filter:cache]
use = egg:swift#memcache
memcache_servers = ${o.host}:${o.memcachePort}

# scripts/t2i_anon_deny.py: anonymous S3 requests get S3's 403 AccessDenied.
[filter:t2i_anon_deny]
paste.filter_factory = t2i_anon_deny:filter_factory
[filter:versioned_writes]
use = egg:swift#versioned_writes
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
`;
  return files;
}

async function httpOk(url: string): Promise<void> {
  const res = await fetch(url, { signal: AbortSignal.timeout(HEALTH_TIMEOUT_MS) });
  await res.arrayBuffer();
  if (res.status !== 200) throw new Error(`GET ${url} answered ${res.status}`);
}

export async function startSwift(dir: string, registry: Registry, placement: Placement): Promise<S3Info> {
  // Swift's scripts start with #!/usr/bin/python3; use that python (not a pyenv/venv one).
  const python = '/usr/bin/python3';
  const bins = {
    proxy: requireExecutable('s3', 'swift-proxy-server', 'swift-proxy'),
    account: requireExecutable('s3', 'swift-account-server', 'swift-account'),
    container: requireExecutable('s3', 'swift-container-server', 'swift-container'),
    object: requireExecutable('s3', 'swift-object-server', 'swift-object'),
    memcached: requireExecutable('s3', 'memcached', 'memcached'),
  };
  const home = join(dir, 's3');
  const swiftDir = join(home, 'etc');
  const devices = join(home, 'devices');
  mkdirSync(swiftDir, { recursive: true });
  mkdirSync(join(devices, 'd1'), { recursive: true });
  // The filter module is copied next to the data, so the running proxy does not depend on the
  // source tree staying as it was.
  const pyDir = join(home, 'python');
  mkdirSync(pyDir, { recursive: true });
  copyFileSync(scriptPath('t2i_anon_deny.py'), join(pyDir, 't2i_anon_deny.py'));
  const ringScript = readScript('swift_rings.py');
  // Python must not pick up a pyenv/venv's modules; only our filter module is added.
  const env: NodeJS.ProcessEnv = { ...process.env, PYTHONPATH: pyDir, PYTHONDONTWRITEBYTECODE: '1' };
  delete env.PYTHONHOME;

  const account = 'test';
  const user = 'tester';
  const secret = randomBytes(16).toString('hex');

  return withPortRetry(registry, async () => {
    const [proxyPort, accountPort, containerPort, objectPort, memcachePort] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort()]);
    const ports: Record<SwiftServer, number> = { account: accountPort, container: containerPort, object: objectPort };
    const files = swiftConfigs({ host: placement.host, swiftDir, devices, osUser: userInfo().username, proxyPort, memcachePort, ports, account, user, secret });
    for (const [name, text] of Object.entries(files)) writeFileSync(join(swiftDir, name), text);

    const ringLog = join(dir, 's3-rings.log');
    const rings = registry.spawn({
      name: 'swift rings',
      cmd: python,
      args: ['-c', ringScript, swiftDir, placement.host, ...SWIFT_SERVERS.map((s) => `${s}=${ports[s]}`)],
      logFile: ringLog,
      env,
      oneShot: true,
    });
    await rings.exited;
    if (rings.child.exitCode !== 0) {
      const hint = /No module named 'swift'/.test(tail(ringLog)) ? `; ${INSTALL_HINT}` : '';
      throw new Error(`s3: building Swift rings failed (exit ${rings.child.exitCode})${hint}. Log ${ringLog}:\n${tail(ringLog)}`);
    }

    // memcached refuses to run as root without -u; `nobody` owns nothing it needs.
    const memcache = registry.spawn({
      name: 'memcached',
      ...serverCommand(placement, bins.memcached, [
        '-p',
        String(memcachePort),
        '-l',
        placement.host,
        '-U',
        '0',
        '-m',
        '64',
        ...(process.getuid?.() === 0 ? ['-u', 'nobody'] : []),
      ]),
      logFile: join(dir, 's3-memcached.log'),
    });
    const servers = (['proxy', ...SWIFT_SERVERS] as const).map((s) =>
      registry.spawn({
        name: `swift-${s}-server`,
        // --verbose: log to stderr (= our log file), not syslog
        ...serverCommand(placement, bins[s], [join(swiftDir, `${s}-server.conf`), '--verbose']),
        logFile: join(dir, `s3-${s}.log`),
        env,
      }),
    );
    const health = [proxyPort, accountPort, containerPort, objectPort].map((p) => `http://${placement.host}:${p}/healthcheck`);
    await waitReady('s3', [memcache, ...servers], READY_TIMEOUT_MS, async () => {
      await Promise.all(health.map(httpOk));
    });

    const info: S3Info = {
      endpoint: `http://${placement.host}:${proxyPort}`,
      port: proxyPort,
      accessKey: `${account}:${user}`,
      secretKey: secret,
      region: S3_REGION,
      pids: [...servers, memcache].map((s) => s.pid),
    };
    // Healthchecks do not exercise auth: one signed request proves s3api + tempauth + account server.
    const client = new Minio.Client({
      endPoint: placement.host,
      port: info.port,
      useSSL: false,
      accessKey: info.accessKey,
      secretKey: info.secretKey,
      region: info.region,
      pathStyle: true,
    });
    await waitReady('s3', servers, READY_TIMEOUT_MS, async () => {
      await client.listBuckets();
    });
    return info;
  });
}
