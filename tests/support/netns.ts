import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';

/**
 * Several hosts on one machine: Linux network namespaces joined by a bridge, each with its own
 * address on a private /24, made by the test itself and removed in teardown even after a failure.
 * The test runner (the root namespace) has the bridge's address, so it reaches every host.
 * A host's link can be cut (`ip link set eth0 down` inside it) and healed: a network partition.
 *
 * Needs root and iproute2 (`ip`). Where namespaces cannot be made, create() fails with why.
 */

const run = promisify(execFile);

export interface Host {
  name: string;
  /** The namespace, for `ip netns exec`. */
  netns: string;
  address: string;
  /** The command prefix that runs a program inside this host. */
  exec: (cmd: string, args: string[]) => { cmd: string; args: string[] };
}

export interface Network {
  /** The root namespace's address on the bridge (the test runner). */
  gateway: string;
  hosts: Record<string, Host>;
  cut(host: string): Promise<void>;
  heal(host: string): Promise<void>;
  destroy(): Promise<void>;
}

async function ip(...args: string[]): Promise<void> {
  try {
    await run('ip', args);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`ip ${args.join(' ')} failed: ${(e.stderr ?? e.message).trim()}`, { cause: err });
  }
}

/**
 * Makes a bridge and one namespace per host name, on 10.<a>.<b>.0/24 with random a and b (so runs
 * do not collide). Names are short: interface names have at most 15 characters.
 */
export async function createNetwork(hostNames: string[]): Promise<Network> {
  if (process.getuid?.() !== 0) {
    throw new Error(
      'network namespaces need root: run the tests as root (CI does); this test cannot be skipped, because the partition it checks can only be made this way',
    );
  }
  const id = randomBytes(2).toString('hex');
  const subnet = `10.${200 + (randomBytes(1)[0]! % 50)}.${randomBytes(1)[0]! % 250}`;
  const bridge = `t2ib${id}`;
  const created: { netns: string[]; links: string[] } = { netns: [], links: [] };
  const destroy = async () => {
    // Deleting a namespace deletes its end of the veth, and with it the pair.
    for (const ns of created.netns) await ip('netns', 'del', ns).catch(() => undefined);
    for (const link of created.links) await ip('link', 'del', link).catch(() => undefined);
  };
  try {
    await ip('link', 'add', bridge, 'type', 'bridge');
    created.links.push(bridge);
    await ip('addr', 'add', `${subnet}.254/24`, 'dev', bridge);
    await ip('link', 'set', bridge, 'up');
    const hosts: Record<string, Host> = {};
    for (const [i, name] of hostNames.entries()) {
      const netns = `t2i-${id}-${name}`;
      const veth = `t2v${id}${i}`;
      await ip('netns', 'add', netns);
      created.netns.push(netns);
      await ip('link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns);
      created.links.push(veth);
      await ip('link', 'set', veth, 'master', bridge, 'up');
      const address = `${subnet}.${i + 1}`;
      await ip('-n', netns, 'addr', 'add', `${address}/24`, 'dev', 'eth0');
      await ip('-n', netns, 'link', 'set', 'eth0', 'up');
      await ip('-n', netns, 'link', 'set', 'lo', 'up');
      hosts[name] = { name, netns, address, exec: (cmd, args) => ({ cmd: 'ip', args: ['netns', 'exec', netns, cmd, ...args] }) };
    }
    const host = (name: string) =>
      hosts[name] ??
      (() => {
        throw new Error(`no host ${name}`);
      })();
    return {
      gateway: `${subnet}.254`,
      hosts,
      cut: (name) => ip('-n', host(name).netns, 'link', 'set', 'eth0', 'down'),
      heal: (name) => ip('-n', host(name).netns, 'link', 'set', 'eth0', 'up'),
      destroy,
    };
  } catch (err) {
    await destroy();
    throw new Error(`could not make the test's network namespaces: ${(err as Error).message}`, { cause: err });
  }
}
