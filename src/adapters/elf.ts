import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readdirSync, readSync, statSync } from 'node:fs';
import path from 'node:path';

/**
 * Shared objects as the glibc loader sees them: which libraries an ELF file asks for (its
 * DT_NEEDED entries, what `readelf -d` prints) and where the loader would find each one, so a
 * missing CUDA or cuDNN library is named before a worker tries to load it. Used by
 * `t2i check-libs` (a build step of Dockerfile.worker) and `t2i doctor`.
 *
 * Only what a static look can see: libraries opened later with dlopen() (cuDNN's sub-libraries,
 * the driver's libcuda.so.1 through cudart) are not in DT_NEEDED. Little-endian ELF only (x86-64
 * and arm64, the platforms onnxruntime-node ships).
 */

export interface ElfInfo {
  file: string;
  bits: 32 | 64;
  /** e_machine: 62 x86-64, 183 aarch64. A library of another machine or class is skipped by the loader. */
  machine: number;
  soname: string | undefined;
  needed: string[];
  /** DT_RPATH, used only when there is no DT_RUNPATH ($ORIGIN not yet expanded). */
  rpath: string[];
  runpath: string[];
}

const DT = { NULL: 0, NEEDED: 1, STRTAB: 5, SONAME: 14, RPATH: 15, RUNPATH: 29 } as const;
const PT_LOAD = 1;
const PT_DYNAMIC = 2;

/** Reads the dynamic section of an ELF file with positional reads (provider libraries are hundreds of MB). */
export function readElf(file: string): ElfInfo {
  const fd = openSync(file, 'r');
  try {
    const read = (offset: number, length: number): Buffer => {
      const buf = Buffer.alloc(length);
      const n = readSync(fd, buf, 0, length, offset);
      if (n < length) throw new Error(`${file}: truncated ELF file (wanted ${length} bytes at offset ${offset}, got ${n})`);
      return buf;
    };
    const ident = read(0, 64);
    if (ident.readUInt32BE(0) !== 0x7f454c46) throw new Error(`${file}: not an ELF file`);
    const bits = ident[4] === 2 ? 64 : ident[4] === 1 ? 32 : undefined;
    if (!bits) throw new Error(`${file}: unknown ELF class ${ident[4]}`);
    if (ident[5] !== 1) throw new Error(`${file}: big-endian ELF is not supported`);
    const machine = ident.readUInt16LE(0x12);
    const word = (b: Buffer, at: number) => (bits === 64 ? Number(b.readBigUInt64LE(at)) : b.readUInt32LE(at));
    const phoff = bits === 64 ? word(ident, 0x20) : ident.readUInt32LE(0x1c);
    const phentsize = ident.readUInt16LE(bits === 64 ? 0x36 : 0x2a);
    const phnum = ident.readUInt16LE(bits === 64 ? 0x38 : 0x2c);

    const loads: { vaddr: number; offset: number; filesz: number }[] = [];
    let dynamic: { offset: number; size: number } | undefined;
    const ph = read(phoff, phentsize * phnum);
    for (let i = 0; i < phnum; i++) {
      const at = i * phentsize;
      const type = ph.readUInt32LE(at);
      // Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, ...; Elf32_Phdr: type, offset, vaddr, paddr, filesz, ...
      const offset = bits === 64 ? word(ph, at + 8) : ph.readUInt32LE(at + 4);
      const vaddr = bits === 64 ? word(ph, at + 16) : ph.readUInt32LE(at + 8);
      const filesz = bits === 64 ? word(ph, at + 32) : ph.readUInt32LE(at + 16);
      if (type === PT_LOAD) loads.push({ vaddr, offset, filesz });
      if (type === PT_DYNAMIC) dynamic = { offset, size: filesz };
    }
    const info: ElfInfo = { file, bits, machine, soname: undefined, needed: [], rpath: [], runpath: [] };
    if (!dynamic) return info; // a static executable needs nothing

    const entrySize = bits === 64 ? 16 : 8;
    const dyn = read(dynamic.offset, dynamic.size);
    const entries: [number, number][] = [];
    for (let at = 0; at + entrySize <= dyn.length; at += entrySize) {
      const tag = word(dyn, at);
      if (tag === DT.NULL) break;
      entries.push([tag, word(dyn, at + entrySize / 2)]);
    }
    // DT_STRTAB holds a virtual address: map it to a file offset through the segment holding it.
    const strtabAddr = entries.find(([t]) => t === DT.STRTAB)?.[1];
    const seg = strtabAddr === undefined ? undefined : loads.find((l) => strtabAddr >= l.vaddr && strtabAddr < l.vaddr + l.filesz);
    if (strtabAddr === undefined || !seg) throw new Error(`${file}: no string table for the dynamic section`);
    const strtab = strtabAddr - seg.vaddr + seg.offset;
    const str = (offset: number): string => {
      const chunk = read(strtab + offset, Math.min(4096, seg.offset + seg.filesz - (strtab + offset)));
      const end = chunk.indexOf(0);
      return chunk.toString('utf8', 0, end < 0 ? chunk.length : end);
    };
    for (const [tag, value] of entries) {
      if (tag === DT.NEEDED) info.needed.push(str(value));
      else if (tag === DT.SONAME) info.soname = str(value);
      else if (tag === DT.RPATH) info.rpath.push(...str(value).split(':').filter(Boolean));
      else if (tag === DT.RUNPATH) info.runpath.push(...str(value).split(':').filter(Boolean));
    }
    return info;
  } finally {
    closeSync(fd);
  }
}

/**
 * Libraries of the NVIDIA driver: they are never in an image, the NVIDIA Container Toolkit
 * mounts them from the host when the container starts with a GPU.
 */
export const DRIVER_LIBRARIES = /^lib(cuda|nvidia-[a-z0-9-]+|nvcuvid|nvoptix)\.so(\.\d+)*$/;

export interface Resolution {
  name: string;
  /** The file the loader would open; undefined when nothing was found. */
  path: string | undefined;
  /** Where it was found: rpath, LD_LIBRARY_PATH, runpath, ld.so.cache, default dirs, or a sibling loaded before. */
  via: string | undefined;
  requiredBy: string;
}

export interface LibraryCheck {
  /** Every shared object looked at: the files given and everything they pull in. */
  objects: string[];
  resolved: Resolution[];
  /** Not found anywhere the loader looks. */
  missing: Resolution[];
  /** Driver libraries that are absent now but are mounted into GPU containers at run time. */
  driver: Resolution[];
}

export interface CheckOptions {
  /** LD_LIBRARY_PATH to assume; the process's own by default. */
  ldLibraryPath?: string;
  /** Sonames already loaded in the process (onnxruntime opens libonnxruntime_providers_shared.so before a provider). */
  preloaded?: Map<string, string>;
  /** The loader's cache: soname -> paths; read from `ldconfig -p` by default. */
  cache?: Map<string, string[]>;
}

/** The loader's cache as `ldconfig -p` prints it (empty if ldconfig is not there). */
export function ldconfigCache(): Map<string, string[]> {
  const cache = new Map<string, string[]>();
  let text = '';
  for (const bin of ['ldconfig', '/sbin/ldconfig', '/usr/sbin/ldconfig']) {
    try {
      text = execFileSync(bin, ['-p'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
      break;
    } catch {
      // try the next location: PATH of a non-root user often lacks /sbin
    }
  }
  for (const line of text.split('\n')) {
    const m = /^\s+(\S+) \(([^)]*)\) => (.+)$/.exec(line);
    if (!m) continue;
    const list = cache.get(m[1]!) ?? [];
    list.push(m[3]!.trim());
    cache.set(m[1]!, list);
  }
  return cache;
}

/** The loader's built-in directories, after the cache (Debian/Ubuntu multiarch ones first). */
function defaultDirs(machine: number): string[] {
  const triplet = machine === 183 ? 'aarch64-linux-gnu' : 'x86_64-linux-gnu';
  return [`/lib/${triplet}`, `/usr/lib/${triplet}`, '/lib64', '/usr/lib64', '/lib', '/usr/lib'];
}

function expandOrigin(dir: string, origin: string): string {
  return dir.replace(/\$(ORIGIN|\{ORIGIN\})/g, origin);
}

/** A file the loader would accept for `owner`: an ELF of the same class and machine. */
function compatible(file: string, owner: ElfInfo): boolean {
  try {
    if (!statSync(file).isFile()) return false;
    const info = readElf(file);
    return info.bits === owner.bits && info.machine === owner.machine;
  } catch {
    return false;
  }
}

/**
 * Resolves every DT_NEEDED entry of `files`, and of what those pull in, in the glibc loader's
 * order: DT_RPATH (when there is no DT_RUNPATH), LD_LIBRARY_PATH, DT_RUNPATH, ld.so.cache, the
 * default directories.
 */
export function checkLibraries(files: string[], options: CheckOptions = {}): LibraryCheck {
  const ldPath = (options.ldLibraryPath ?? process.env.LD_LIBRARY_PATH ?? '').split(/[:;]/).filter(Boolean);
  const cache = options.cache ?? ldconfigCache();
  const preloaded = options.preloaded ?? new Map<string, string>();
  const result: LibraryCheck = { objects: [], resolved: [], missing: [], driver: [] };
  const seen = new Set<string>();
  const queue = files.map((f) => path.resolve(f));

  while (queue.length > 0) {
    const file = queue.shift()!;
    if (seen.has(file)) continue;
    seen.add(file);
    result.objects.push(file);
    const owner = readElf(file);
    const origin = path.dirname(file);
    for (const name of owner.needed) {
      const r = resolveOne(name, owner, origin, ldPath, cache, preloaded);
      const entry: Resolution = { name, path: r?.path, via: r?.via, requiredBy: file };
      if (r) {
        result.resolved.push(entry);
        queue.push(r.path);
      } else if (DRIVER_LIBRARIES.test(name)) result.driver.push(entry);
      else result.missing.push(entry);
    }
  }
  return result;
}

function resolveOne(
  name: string,
  owner: ElfInfo,
  origin: string,
  ldPath: string[],
  cache: Map<string, string[]>,
  preloaded: Map<string, string>,
): { path: string; via: string } | undefined {
  if (name.includes('/')) {
    const p = path.resolve(origin, name);
    return compatible(p, owner) ? { path: p, via: 'path' } : undefined;
  }
  const inDirs = (dirs: string[], via: string) => {
    for (const d of dirs) {
      const p = path.join(expandOrigin(d, origin), name);
      if (compatible(p, owner)) return { path: p, via };
    }
    return undefined;
  };
  return (
    (owner.runpath.length === 0 ? inDirs(owner.rpath, 'rpath') : undefined) ??
    inDirs(ldPath, 'LD_LIBRARY_PATH') ??
    inDirs(owner.runpath, 'runpath') ??
    (cache.get(name) ?? []).filter((p) => compatible(p, owner)).map((p) => ({ path: p, via: 'ld.so.cache' }))[0] ??
    inDirs(defaultDirs(owner.machine), 'default dirs') ??
    (preloaded.has(name) ? { path: preloaded.get(name)!, via: 'loaded before' } : undefined)
  );
}

/** Shared objects in a directory: *.so, *.so.N and Node add-ons (*.node). */
export function sharedObjectsIn(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => /\.so(\.\d+)*$|\.node$/.test(f))
    .map((f) => path.join(dir, f))
    .filter((f) => statSync(f).isFile())
    .sort();
}

/** Where the loader would find `name` for a library of this process's architecture (LD_LIBRARY_PATH, ld.so.cache, default dirs), or undefined. */
export function findLibrary(name: string, options: Pick<CheckOptions, 'ldLibraryPath' | 'cache'> = {}): string | undefined {
  const machine = process.arch === 'arm64' ? 183 : 62;
  const owner: ElfInfo = { file: '', bits: 64, machine, soname: undefined, needed: [], rpath: [], runpath: [] };
  const ldPath = (options.ldLibraryPath ?? process.env.LD_LIBRARY_PATH ?? '').split(/[:;]/).filter(Boolean);
  return resolveOne(name, owner, '/', ldPath, options.cache ?? ldconfigCache(), new Map())?.path;
}
