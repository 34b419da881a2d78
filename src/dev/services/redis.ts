/**
 * A throwaway Redis: no snapshots, no append-only file, and `noeviction`, which BullMQ needs
 * (an evicted job key silently loses work). Started in the foreground so the PID we spawned is
 * the server's.
 */
import { mkdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import {
  isLoopback,
  requireExecutable,
  restartable,
  serverCommand,
  waitReady,
  type Managed,
  type Placement,
  type Registry,
  type Restartable,
} from './process.js';

export interface RedisInfo {
  /** redis://HOST:PORT (HOST is 127.0.0.1 by default) */
  url: string;
  port: number;
  pid: number;
}

/** Redis is ready in about 0.1 s. */
const READY_TIMEOUT_MS = 10_000;
/** One PING's time limit (ms). */
const PING_TIMEOUT_MS = 2_000;

/** One raw PING over TCP: resolves on +PONG, rejects on anything else (e.g. -LOADING). */
function redisPing(host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port });
    let buf = '';
    const fail = (err: Error) => {
      sock.destroy();
      reject(err);
    };
    sock.setTimeout(PING_TIMEOUT_MS, () => fail(new Error('PING timed out')));
    sock.on('error', fail);
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString();
      if (!buf.includes('\r\n')) return;
      sock.end();
      if (buf.startsWith('+PONG')) resolve();
      else reject(new Error(`PING answered ${JSON.stringify(buf.trim())}`));
    });
  });
}

export async function startRedis(dir: string, registry: Registry, placement: Placement): Promise<Restartable<RedisInfo>> {
  const cmd = requireExecutable('redis', 'redis-server', 'redis-server');
  const data = join(dir, 'redis');
  mkdirSync(data, { recursive: true });
  const logFile = join(dir, 'redis.log');
  const launch = async (port: number): Promise<Managed> => {
    const command = serverCommand(placement, cmd, [
      '--port',
      String(port),
      '--bind',
      placement.host,
      // Protected mode refuses clients from other addresses when there is no password; off the
      // loopback the clients are the test's own, in its private network.
      ...(isLoopback(placement.host) ? [] : ['--protected-mode', 'no']),
      '--dir',
      data,
      '--save',
      '', // no snapshots: throwaway data
      '--appendonly',
      'no',
      // BullMQ requires noeviction: an evicted job key silently loses work.
      '--maxmemory-policy',
      'noeviction',
      '--daemonize',
      'no', // keep the PID we spawned as the server's
    ]);
    const server = registry.spawn({ name: 'redis-server', ...command, logFile });
    await waitReady('redis', [server], READY_TIMEOUT_MS, () => redisPing(placement.host, port));
    return server;
  };
  return restartable(registry, launch, (port, pid): RedisInfo => ({ url: `redis://${placement.host}:${port}`, port, pid }));
}
