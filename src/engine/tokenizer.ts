/**
 * CLIP's byte-level BPE tokenizer, reproducing what Stable Diffusion pipelines feed the text
 * encoder: transformers' `CLIPTokenizer(prompt, padding="max_length", max_length=77,
 * truncation=True)`.
 *
 * Why our own: the maintained JS libraries (@huggingface/tokenizers, and the AutoTokenizer of
 * @huggingface/transformers built on it) load only a `tokenizer.json` (+ tokenizer_config.json),
 * while diffusers/optimum Stable Diffusion exports ship the slow-tokenizer files vocab.json +
 * merges.txt. The algorithm is about a hundred lines, and owning it lets us report truncation.
 *
 * Deliberate choices where transformers' two code paths (with or without `ftfy` installed)
 * differ: we follow the ftfy path that OpenAI trained CLIP with (NFC, HTML entities, curly
 * quotes straightened, no spaces forced around CJK characters), and approximate ftfy with the
 * few fixes that matter for prompts (no ligature or full-width repair).
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { byteEncode, byteSymbolsInVocabOrder, cleanText, cleanUpTokenizationSpaces, CLIP_SPLIT, symbolsToText } from './clip-text.js';

export const CLIP_BOS = '<|startoftext|>';
export const CLIP_EOS = '<|endoftext|>';
const DEFAULT_MODEL_MAX_LENGTH = 77;
/** transformers reads at most 49152 - 256 - 2 merges from merges.txt, whatever the file holds. */
export const CLIP_MERGE_COUNT = 48894;
/** Room for bos + eos + at least one content token; far above any CLIP context (77). */
const MIN_MODEL_MAX_LENGTH = 3;
const MAX_MODEL_MAX_LENGTH = 4096;
/** Bounds the BPE memo: a long-lived worker sees unbounded distinct words over time. */
const BPE_CACHE_LIMIT = 20_000;
const WORD_END = '</w>';

export type Vocab = ReadonlyMap<string, number> | Readonly<Record<string, number>>;

export interface SpecialTokenOptions {
  bosToken?: string;
  eosToken?: string;
  /** SD 1.x pads with the end token; SD 2.x exports use "!" (id 0). */
  padToken?: string;
  unkToken?: string;
  modelMaxLength?: number;
}

export interface TokenizerData extends SpecialTokenOptions {
  vocab: Vocab;
  /** In rank order, each "left right" as in merges.txt (no header line). */
  merges: readonly string[];
}

export interface Encoding {
  /** bos, content, eos, then padding: always `modelMaxLength` long. */
  ids: Int32Array;
  /** Tokens before the padding (content + 2); SD 1.x pads with eos, so ids alone can't tell. */
  attentionLength: number;
  truncated: boolean;
  droppedTokens: number;
  /** Readable rendering of the dropped tokens, for a "prompt truncated" warning. */
  droppedText: string;
}

// ---------------------------------------------------------------------------------------------

function isMap(vocab: Vocab): vocab is ReadonlyMap<string, number> {
  return vocab instanceof Map;
}

function vocabToMap(vocab: Vocab, source: string): Map<string, number> {
  const map = new Map<string, number>();
  const entries: Iterable<[string, number]> = isMap(vocab) ? vocab.entries() : Object.entries(vocab);
  for (const [token, id] of entries) {
    if (!Number.isInteger(id) || id < 0) {
      throw new Error(
        `${source}: expected a JSON object mapping token to id (a non-negative integer), ` + `but ${JSON.stringify(token)} maps to ${JSON.stringify(id)}`,
      );
    }
    map.set(token, id);
  }
  if (map.size === 0) throw new Error(`${source}: expected a JSON object mapping token to id, got an empty one`);
  return map;
}

function parseMergePair(line: string, where: string): [string, string] {
  const parts = line.trim().split(/\s+/);
  if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
    throw new Error(`${where}: expected a merge "left right", got ${JSON.stringify(line)}`);
  }
  return [parts[0]!, parts[1]!];
}

function resolveSpecial(vocab: ReadonlyMap<string, number>, token: string, role: string, source: string): number {
  // An empty special would match everywhere when split out of the prompt.
  if (token === '') throw new Error(`${source}: ${role} must not be empty`);
  const id = vocab.get(token);
  if (id === undefined) {
    throw new Error(`${source}: ${role} ${JSON.stringify(token)} is not in the vocabulary`);
  }
  return id;
}

function checkModelMaxLength(value: unknown, source: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < MIN_MODEL_MAX_LENGTH || value > MAX_MODEL_MAX_LENGTH) {
    throw new Error(
      `${source}: model_max_length must be an integer from ${MIN_MODEL_MAX_LENGTH} to ${MAX_MODEL_MAX_LENGTH}, ` + `got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

type SpecialOption = keyof SpecialTokenOptions;

/** Where each option came from, so an error names the file to fix. */
interface OptionSources {
  set: Partial<Record<SpecialOption, string>>;
  /** For options left at CLIP's defaults. */
  fallback: string;
}

function sourceOf(sources: OptionSources, option: SpecialOption): string {
  return sources.set[option] ?? `${sources.fallback} (default)`;
}

export class ClipTokenizer {
  readonly modelMaxLength: number;
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly unkId: number;
  readonly bosToken: string;
  readonly eosToken: string;
  readonly padToken: string;
  readonly unkToken: string;

  private readonly vocab: ReadonlyMap<string, number>;
  private readonly idToToken: ReadonlyMap<number, string>;
  /** Key "left right" -> rank; lower merges first. */
  private readonly ranks: ReadonlyMap<string, number>;
  /** Longest first, so a special that prefixes another can't shadow it. */
  private readonly specialsByLength: readonly string[];
  private readonly bpeCache = new Map<string, readonly string[]>();

  private constructor(vocab: Map<string, number>, ranks: Map<string, number>, options: Required<SpecialTokenOptions>, sources: OptionSources) {
    this.vocab = vocab;
    // Later tokens win on duplicate ids, as in transformers' `{v: k for k, v in encoder.items()}`.
    this.idToToken = new Map([...vocab].map(([token, id]) => [id, token]));
    this.ranks = ranks;
    this.modelMaxLength = checkModelMaxLength(options.modelMaxLength, sourceOf(sources, 'modelMaxLength'));
    this.bosToken = options.bosToken;
    this.eosToken = options.eosToken;
    this.padToken = options.padToken;
    this.unkToken = options.unkToken;
    this.bosId = resolveSpecial(vocab, options.bosToken, 'bos_token', sourceOf(sources, 'bosToken'));
    this.eosId = resolveSpecial(vocab, options.eosToken, 'eos_token', sourceOf(sources, 'eosToken'));
    this.padId = resolveSpecial(vocab, options.padToken, 'pad_token', sourceOf(sources, 'padToken'));
    this.unkId = resolveSpecial(vocab, options.unkToken, 'unk_token', sourceOf(sources, 'unkToken'));
    this.specialsByLength = [...new Set([this.bosToken, this.eosToken, this.padToken, this.unkToken])].sort((a, b) => b.length - a.length);
  }

  get vocabSize(): number {
    return this.vocab.size;
  }

  /** Builds a tokenizer from in-memory data (tests, generated models). Merges are in rank order. */
  static fromData(data: TokenizerData): ClipTokenizer {
    const vocab = vocabToMap(data.vocab, 'vocab');
    const ranks = new Map<string, number>();
    data.merges.forEach((line, i) => {
      const [a, b] = parseMergePair(line, `merges[${i}]`);
      const key = `${a} ${b}`;
      if (!ranks.has(key)) ranks.set(key, i);
    });
    return new ClipTokenizer(vocab, ranks, withDefaults(data), { set: {}, fallback: 'tokenizer options' });
  }

  /**
   * Loads the `tokenizer/` folder of a diffusers or optimum export. vocab.json and merges.txt
   * are required; tokenizer_config.json and special_tokens_map.json are optional, as in
   * transformers (newer versions no longer write the latter), but must be valid when present.
   * special_tokens_map.json overrides tokenizer_config.json, which overrides CLIP's defaults.
   */
  static async fromDirectory(dir: string): Promise<ClipTokenizer> {
    const vocabPath = path.join(dir, 'vocab.json');
    const mergesPath = path.join(dir, 'merges.txt');
    const configPath = path.join(dir, 'tokenizer_config.json');
    const specialsPath = path.join(dir, 'special_tokens_map.json');

    const vocabJson = await readJson(vocabPath, true);
    if (!isPlainObject(vocabJson)) {
      throw new Error(`${vocabPath}: expected a JSON object mapping token to id, got ${describeJson(vocabJson)}`);
    }
    const vocab = vocabToMap(vocabJson as Record<string, number>, vocabPath);

    const mergesText = await readText(mergesPath, true);
    const ranks = parseMergesFile(mergesText!, mergesPath);

    const options: SpecialTokenOptions = {};
    const sources: OptionSources = { set: {}, fallback: dir };
    const config = await readJson(configPath, false);
    if (config !== undefined) {
      if (!isPlainObject(config)) throw new Error(`${configPath}: expected a JSON object, got ${describeJson(config)}`);
      if (config['model_max_length'] !== undefined) {
        options.modelMaxLength = checkModelMaxLength(config['model_max_length'], configPath);
        sources.set.modelMaxLength = configPath;
      }
      readSpecialTokens(config, configPath, options, sources);
    }
    const specials = await readJson(specialsPath, false);
    if (specials !== undefined) {
      if (!isPlainObject(specials)) {
        throw new Error(`${specialsPath}: expected a JSON object of special tokens, got ${describeJson(specials)}`);
      }
      readSpecialTokens(specials, specialsPath, options, sources);
    }
    return new ClipTokenizer(vocab, ranks, withDefaults(options), sources);
  }

  /** Content ids of `text`, without bos/eos, padding or truncation. */
  tokenize(text: string): number[] {
    const ids: number[] = [];
    // transformers splits special-token strings out before any clean-up, so for SD 2.x
    // (pad "!") every "!" in a prompt becomes id 0 rather than CLIP's "!" tokens.
    for (const chunk of this.splitOnSpecials(text)) {
      if (typeof chunk === 'number') {
        ids.push(chunk);
        continue;
      }
      for (const match of cleanText(chunk).matchAll(CLIP_SPLIT)) {
        const piece = match[0];
        if (piece === CLIP_BOS || piece === CLIP_EOS) {
          ids.push(this.vocab.get(piece) ?? this.unkId);
          continue;
        }
        for (const symbol of this.bpe(byteEncode(piece))) ids.push(this.vocab.get(symbol) ?? this.unkId);
      }
    }
    return ids;
  }

  /** Fixed-length ids as Stable Diffusion pipelines build them, with a truncation report. */
  encode(text: string): Encoding {
    const content = this.tokenize(text);
    const room = this.modelMaxLength - 2;
    const kept = content.length > room ? content.slice(0, room) : content;
    const dropped = content.length > room ? content.slice(room) : [];

    const ids = new Int32Array(this.modelMaxLength).fill(this.padId);
    ids[0] = this.bosId;
    ids.set(kept, 1);
    ids[kept.length + 1] = this.eosId;
    return {
      ids,
      attentionLength: kept.length + 2,
      truncated: dropped.length > 0,
      droppedTokens: dropped.length,
      droppedText: dropped.length > 0 ? this.decode(dropped) : '',
    };
  }

  /** Text for ids, skipping bos/eos/pad (for SD 2.x that includes every "!"). */
  decode(ids: ArrayLike<number>): string {
    const skip = new Set([this.bosId, this.eosId, this.padId]);
    let joined = '';
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (skip.has(id)) continue;
      const token = this.idToToken.get(id);
      if (token === undefined) {
        throw new RangeError(`decode: id ${id} is not in the vocabulary (${this.vocab.size} tokens)`);
      }
      joined += token;
    }
    const text = symbolsToText(joined).replaceAll(WORD_END, ' ');
    return cleanUpTokenizationSpaces(text.trim()).trim();
  }

  private splitOnSpecials(text: string): Array<string | number> {
    const out: Array<string | number> = [];
    let start = 0;
    let i = 0;
    while (i < text.length) {
      const special = this.specialsByLength.find((s) => text.startsWith(s, i));
      if (special === undefined) {
        i++;
        continue;
      }
      if (i > start) out.push(text.slice(start, i));
      out.push(this.vocab.get(special)!);
      i += special.length;
      start = i;
    }
    if (start < text.length) out.push(text.slice(start));
    return out;
  }

  /**
   * Symbols of one byte-encoded word. Like CLIP: find the lowest-ranked adjacent pair, merge
   * every non-overlapping occurrence of it left to right, repeat. (A heap that merges one
   * occurrence at a time can differ from this when a fresh pair outranks the remaining ones.)
   * Pair ranks are kept in an array and looked up again only beside a merge, so a long word
   * costs a numeric scan per round instead of a string-keyed lookup per pair.
   */
  private bpe(word: string): readonly string[] {
    const cached = this.bpeCache.get(word);
    if (cached) return cached;

    // Byte-encoded text is all BMP characters, so code units are symbols.
    let symbols = word.split('');
    symbols[symbols.length - 1] += WORD_END;
    let pairRanks = symbols.slice(1).map((second, i) => this.pairRank(symbols[i]!, second));
    for (;;) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < pairRanks.length; i++) {
        if (pairRanks[i]! < bestRank) {
          bestRank = pairRanks[i]!;
          best = i;
        }
      }
      if (best < 0) break;
      const first = symbols[best]!;
      const second = symbols[best + 1]!;
      const merged: string[] = [];
      const fromOld: number[] = []; // index in `symbols` of each merged symbol, -1 if new
      for (let i = 0; i < symbols.length;) {
        if (i >= best && symbols[i] === first && i + 1 < symbols.length && symbols[i + 1] === second) {
          merged.push(first + second);
          fromOld.push(-1);
          i += 2;
        } else {
          merged.push(symbols[i]!);
          fromOld.push(i);
          i += 1;
        }
      }
      const ranks: number[] = new Array<number>(merged.length - 1);
      for (let j = 0; j + 1 < merged.length; j++) {
        const a = fromOld[j]!;
        const b = fromOld[j + 1]!;
        // Two untouched neighbours were neighbours before, so their rank is unchanged.
        ranks[j] = a >= 0 && b >= 0 ? pairRanks[a]! : this.pairRank(merged[j]!, merged[j + 1]!);
      }
      symbols = merged;
      pairRanks = ranks;
    }

    if (this.bpeCache.size >= BPE_CACHE_LIMIT) this.bpeCache.clear();
    this.bpeCache.set(word, symbols);
    return symbols;
  }

  private pairRank(first: string, second: string): number {
    return this.ranks.get(`${first} ${second}`) ?? Infinity;
  }
}

function withDefaults(options: SpecialTokenOptions): Required<SpecialTokenOptions> {
  return {
    bosToken: options.bosToken ?? CLIP_BOS,
    eosToken: options.eosToken ?? CLIP_EOS,
    padToken: options.padToken ?? CLIP_EOS,
    unkToken: options.unkToken ?? CLIP_EOS,
    modelMaxLength: options.modelMaxLength ?? DEFAULT_MODEL_MAX_LENGTH,
  };
}

// ---------------------------------------------------------------------------------------------
// Files.

/** Parses merges.txt as transformers does: a "#version" header line, then at most 48,894 pairs. */
function parseMergesFile(text: string, file: string): Map<string, number> {
  const lines = text.trim().split('\n');
  const first = lines[0] ?? '';
  // transformers drops line 1 unconditionally; we only drop a header, so a header-less file
  // keeps its first merge instead of silently losing it.
  const start = first.startsWith('#') ? 1 : 0;
  const ranks = new Map<string, number>();
  const end = Math.min(lines.length, start + CLIP_MERGE_COUNT);
  for (let i = start; i < end; i++) {
    const line = lines[i]!;
    if (line.trim() === '') continue;
    const [a, b] = parseMergePair(line, `${file}:${i + 1}`);
    const key = `${a} ${b}`;
    if (!ranks.has(key)) ranks.set(key, i - start);
  }
  return ranks;
}

const SPECIAL_KEYS = [
  ['bos_token', 'bosToken'],
  ['eos_token', 'eosToken'],
  ['pad_token', 'padToken'],
  ['unk_token', 'unkToken'],
] as const;

/** A special token is a string or an AddedToken object `{content: string, ...}`. */
function readSpecialTokens(json: Record<string, unknown>, file: string, into: SpecialTokenOptions, sources: OptionSources): void {
  for (const [key, option] of SPECIAL_KEYS) {
    const value = json[key];
    if (value === undefined || value === null) continue;
    if (typeof value === 'string') {
      into[option] = value;
    } else if (isPlainObject(value) && typeof value['content'] === 'string') {
      into[option] = value['content'];
    } else {
      throw new Error(`${file}: ${key} must be a string or an object with a string "content", got ${describeJson(value)}`);
    }
    sources.set[option] = file;
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function describeJson(value: unknown): string {
  if (Array.isArray(value)) return 'an array';
  if (value === null) return 'null';
  return typeof value === 'object' ? 'an object' : `${typeof value} ${JSON.stringify(value)}`;
}

async function readText(file: string, required: boolean): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return undefined;
    if (code === 'ENOENT') throw new Error(`${file}: file not found (expected a CLIP tokenizer folder)`, { cause: err });
    throw new Error(`${file}: cannot read (${(err as Error).message})`, { cause: err });
  }
}

async function readJson(file: string, required: boolean): Promise<unknown> {
  const text = await readText(file, required);
  if (text === undefined) return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new Error(`${file}: invalid JSON (${(err as Error).message})`, { cause: err });
  }
}

/**
 * CLIP's vocabulary from OpenAI's raw merges file (`bpe_simple_vocab_16e6.txt`, split into
 * lines, header included): 256 byte symbols, the same with "</w>", one token per merge, then
 * the start and end tokens, i.e. 49,408 ids for the full file.
 */
export function clipVocabFromBpeMerges(
  mergesLines: readonly string[],
  mergeCount: number = CLIP_MERGE_COUNT,
): { vocab: Map<string, number>; merges: string[] } {
  if (mergesLines.length < mergeCount + 1) {
    throw new Error(`CLIP merges: expected a header line and ${mergeCount} merges, got ${mergesLines.length} lines`);
  }
  const merges = mergesLines.slice(1, mergeCount + 1).map((line, i) => parseMergePair(line, `CLIP merges:${i + 2}`));
  const bytes = byteSymbolsInVocabOrder();
  const tokens = [...bytes, ...bytes.map((s) => s + WORD_END), ...merges.map(([a, b]) => a + b), CLIP_BOS, CLIP_EOS];
  const vocab = new Map<string, number>();
  // A repeated token keeps its last id, as Python's dict(zip(vocab, range(len(vocab)))) does.
  tokens.forEach((token, id) => vocab.set(token, id));
  return { vocab, merges: merges.map(([a, b]) => `${a} ${b}`) };
}
