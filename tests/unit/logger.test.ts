import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { createLogger, createProcessLogger, scrubSecrets, type Logger, type LogLevel } from '../../src/core/logger.js';

/** Log lines written to a captured stream, parsed. */
function capture(level: LogLevel = 'info', extra: { secrets?: string[] } = {}) {
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString().split('\n').filter(Boolean));
      cb();
    },
  });
  const logger = createLogger({ name: 'test', level, pretty: false, destination, ...extra });
  return { logger, lines, json: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

/** pino-roll's stream (a SonicBoom, 'write' after each write reached the file, plus pino-roll's 'cleanup-complete'): the events the rotation test waits on. */
interface RotatingFile {
  on(event: 'cleanup-complete', listener: () => void): unknown;
  once(event: 'write' | 'close', listener: () => void): unknown;
  end(): void;
}

/**
 * The rotating file stream inside a process logger: createProcessLogger gives stdout and the
 * file each a stream of pino's multistream (reached through pino's exported stream symbol), and
 * the one that is not `stdout` is the file.
 */
function rotatingFileOf(logger: Logger, stdout: Writable): RotatingFile {
  const multi = (logger as unknown as Record<symbol, { streams?: { stream: unknown }[] }>)[pino.symbols.streamSym];
  const file = multi?.streams?.map((s) => s.stream).find((s) => s !== stdout);
  if (!file) throw new Error('createProcessLogger made no second stream for LOG_FILE');
  return file as RotatingFile;
}

const SECRET = 'sup3r-s3cret/key+value';
const ACCESS = 'AKIAEXAMPLEACCESS';
const PRESIGNED =
  'https://s3.example.com/t2i-images/images/ab/abc.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEACCESS%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=604800&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef';

describe('logger', () => {
  it('writes JSON lines with name, level and the bound context on every line of a child', () => {
    const { logger, json } = capture('info');
    const job = logger.child({ jobId: 'j-1', attempt: 2, workerId: 'w-1' });
    job.info({ steps: 4 }, 'generation started');
    job.debug({}, 'not at info');
    job.warn({}, 'slow');
    const out = json();
    expect(out).toHaveLength(2);
    for (const line of out) expect(line).toMatchObject({ name: 'test', jobId: 'j-1', attempt: 2, workerId: 'w-1' });
    expect(out[0]).toMatchObject({ level: 30, msg: 'generation started', steps: 4 });
    expect(out[1]).toMatchObject({ level: 40, msg: 'slow' });
  });

  it('redacts authorization headers and storage keys wherever they are logged', () => {
    const { logger, lines, json } = capture('debug', { secrets: [SECRET, ACCESS] });
    logger.info({ req: { method: 'GET', url: '/x', headers: { authorization: 'Bearer abc.def.ghi', cookie: 'sid=1' } } }, 'request');
    logger.info({ headers: { authorization: 'Basic dXNlcjpwYXNz' } }, 'outgoing');
    logger.info({ storage: { secretKey: 'anything', accessKey: 'anything-too', bucket: 'b' } }, 'storage options');
    logger.error({ err: new Error(`S3 said: bad signature for key ${ACCESS} with secret ${SECRET}`) }, `login with ${SECRET}`);
    logger.info({ env: { STORAGE_SECRET_KEY: SECRET } }, 'config');
    const text = lines.join('\n');
    for (const leaked of [SECRET, ACCESS, 'abc.def.ghi', 'dXNlcjpwYXNz', 'anything', JSON.stringify(SECRET).slice(1, -1), encodeURIComponent(SECRET)]) {
      expect(text).not.toContain(leaked);
    }
    const out = json();
    expect(out[0]).toMatchObject({ req: { method: 'GET', url: '/x', headers: { authorization: '[redacted]', cookie: '[redacted]' } } });
    expect(out[2]).toMatchObject({ storage: { secretKey: '[redacted]', accessKey: '[redacted]', bucket: 'b' } });
    expect(out[3]!.msg).toBe('login with [redacted]');
  });

  it('redacts the signature and credential of a presigned URL in fields and messages, keeping the rest', () => {
    const { logger, lines } = capture('info');
    logger.info({ url: PRESIGNED }, 'presigned');
    logger.info({ nested: { link: PRESIGNED } }, `sending ${PRESIGNED}`);
    const text = lines.join('\n');
    expect(text).not.toContain('0123456789abcdef0123456789abcdef');
    expect(text).not.toContain('AKIAEXAMPLEACCESS');
    expect(text).toContain('X-Amz-Signature=[redacted]');
    expect(text).toContain('https://s3.example.com/t2i-images/images/ab/abc.png?');
    expect(text).toContain('X-Amz-Expires=604800');
    // Fastify's request lines keep their path.
    expect(scrubSecrets('"url":"/generated-images/1/url"')).toBe('"url":"/generated-images/1/url"');
  });

  it('blanks the secret of an API key wherever it appears, keeping its public prefix', () => {
    const { logger, lines } = capture('info');
    const key = `t2i_0a1b2c3d_${'9f'.repeat(32)}`;
    logger.info({ url: `/generated-images?api_key=${key}` }, `a client sent ${key} in the wrong place`);
    const text = lines.join('\n');
    expect(text).not.toContain('9f'.repeat(32));
    expect(text).toContain('t2i_0a1b2c3d_[redacted]');
  });

  it('logs prompts at debug level only', () => {
    const atInfo = capture('info');
    atInfo.logger.info({ prompt: 'a castle in the Loire valley', negativePrompt: 'ugly', steps: 3 }, 'started');
    atInfo.logger.debug({ prompt: 'a castle in the Loire valley' }, 'prompt');
    expect(atInfo.lines.join('\n')).not.toContain('Loire');
    expect(atInfo.json()[0]).toMatchObject({ steps: 3, prompt: '[debug level only]', negativePrompt: '[debug level only]' });

    const atDebug = capture('debug');
    atDebug.logger.debug({ prompt: 'a castle in the Loire valley' }, 'prompt');
    expect(atDebug.json()[0]).toMatchObject({ prompt: 'a castle in the Loire valley' });
  });

  it('logs nothing at silent', () => {
    const { logger, lines } = capture('silent');
    logger.error({}, 'nobody hears this');
    expect(lines).toEqual([]);
  });
});

describe('rotating log file (LOG_FILE)', () => {
  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  it('writes JSON lines to the file at its own level alongside stdout, rotating by size and keeping LOG_FILE_RETENTION files', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 't2i-logs-'));
    dirs.push(dir);
    const config = loadConfig({
      DATABASE_URL: 'postgresql://x@localhost/x',
      STORAGE_ENDPOINT: 'localhost:9000',
      STORAGE_ACCESS_KEY: ACCESS,
      STORAGE_SECRET_KEY: SECRET,
      LOG_LEVEL: 'warn',
      LOG_FILE: path.join(dir, 'api.log'),
      LOG_FILE_LEVEL: 'debug',
      LOG_FILE_MAX_SIZE: '1k',
      LOG_FILE_FREQUENCY: 'none',
      LOG_FILE_RETENTION: '2',
    });
    const stdoutLines: string[] = [];
    const destination = new Writable({
      write(chunk: Buffer, _enc, cb) {
        stdoutLines.push(...chunk.toString().split('\n').filter(Boolean));
        cb();
      },
    });
    const logger = await createProcessLogger(config, 'api', destination);
    const file = rotatingFileOf(logger, destination);
    const cleanups: Array<() => void> = [];
    file.on('cleanup-complete', () => cleanups.splice(0).forEach((f) => f()));
    for (let i = 0; i < 60; i++) {
      // One write per line, each awaited: pino-roll checks the size after each write that
      // reached the file, so the file rolls about every 1 KiB instead of once for a burst.
      const written = new Promise<void>((resolve) => file.once('write', () => resolve()));
      logger.debug({ i, secret: `${SECRET}` }, `line ${i} with some padding to fill the file quickly ............`);
      await written;
    }
    logger.warn({}, 'a warning');
    // Closing the file writes what is buffered and starts no further roll.
    await new Promise<void>((resolve) => {
      file.once('close', () => resolve());
      file.end();
    });
    // Each roll then removes the files past the retention and emits 'cleanup-complete': the
    // folder is looked at again after each, until the retention holds (or the deadline passes).
    const logFiles = async () =>
      (await readdir(dir)).filter((f) => /^api\.\d+\.log$/.test(f)).sort((a, b) => Number(a.split('.')[1]) - Number(b.split('.')[1]));
    const deadline = Date.now() + 10_000;
    let files: string[];
    for (;;) {
      // Listen before looking, so a clean-up that ends while the folder is read is not missed.
      let timer: NodeJS.Timeout | undefined;
      const nextCleanup = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
        cleanups.push(resolve);
      });
      files = await logFiles();
      const late = Date.now() >= deadline;
      if (files.length > 3 && !late) await nextCleanup;
      clearTimeout(timer);
      if (files.length <= 3) break;
      if (late) throw new Error(`still ${files.length} log files 10 s after the last write: ${files.join(', ')}`);
    }

    // stdout at warn only; the file at debug.
    expect(stdoutLines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['a warning']);
    // Rotated at 1 KiB: many files were written, but only the current one and 2 more are kept.
    expect(files.length).toBe(3);
    expect(Number(files.at(-1)!.split('.')[1])).toBeGreaterThan(3);
    const current = await readFile(path.join(dir, files.at(-1)!), 'utf8');
    const last = current
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { msg: string; level: number; name: string });
    expect(last.at(-1)).toMatchObject({ msg: 'a warning', level: 40, name: 'api' });
    const all = (await Promise.all(files.map((f) => readFile(path.join(dir, f), 'utf8')))).join('');
    expect(all).not.toContain(SECRET);
    expect(all).toContain('"level":20');
  });
});
