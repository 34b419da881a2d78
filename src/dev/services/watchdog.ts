/**
 * The watchdog: a detached shell (scripts/watchdog.sh) that outlives this Node process and, if
 * it dies without calling stop(), stops the servers listed in the pid file and removes the
 * services folder.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readScript } from './process.js';

export function startWatchdog(pidFile: string, removeDir: string): ChildProcess {
  // The script's text is passed with -c, not its path: sh reads a script file as it runs, so an
  // edit of the source tree during a long test run could change what a live watchdog executes.
  // Its comment lines are left out, so that `ps` shows a readable command line.
  const script = readScript('watchdog.sh').replace(/^\s*#.*\n/gm, '');
  const child = spawn('/bin/sh', ['-c', script, 'services-watchdog', String(process.pid), pidFile, removeDir], {
    detached: true,
    stdio: 'ignore',
  });
  child.unref();
  return child;
}
