import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeTokenizerDirectory } from '../../src/engine/testmodels/tokenizer-files.js';
import { ClipTokenizer, clipVocabFromBpeMerges, type TokenizerData } from '../../src/engine/tokenizer.js';

function findRepoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, 'package.json'))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error('package.json not found above the test file');
    dir = parent;
  }
  return dir;
}

/**
 * CLIP's merges file lives in shared/data/clip beside the repository (CI clones the repo
 * elsewhere with a copy of shared/ beside it), or beside a folder above it: a git worktree in
 * /work/wt/NAME uses /work/shared. The first candidate is where it should be when none exists.
 */
function findClipMerges(): { file: string; exists: boolean } {
  const candidates: string[] = [];
  for (let dir = path.dirname(findRepoRoot()); ; dir = path.dirname(dir)) {
    candidates.push(path.join(dir, 'shared', 'data', 'clip', 'bpe_simple_vocab_16e6.txt.gz'));
    if (path.dirname(dir) === dir) break;
  }
  const found = candidates.find((f) => existsSync(f));
  return found ? { file: found, exists: true } : { file: candidates[0]!, exists: false };
}
const MERGES_GZ = findClipMerges();

const BOS = 49406;
const EOS = 49407;

/** Content ids between bos and eos. */
function content(tok: ClipTokenizer, text: string): number[] {
  const e = tok.encode(text);
  return Array.from(e.ids.slice(1, e.attentionLength - 1));
}

/** The real CLIP merges file is required: without it these tests fail, saying where it belongs. */
function loadClipData(): TokenizerData {
  if (!MERGES_GZ.exists) {
    throw new Error(
      `CLIP's BPE merges file is missing: the real-vocabulary tokenizer tests need ${MERGES_GZ.file} ` +
        '(bpe_simple_vocab_16e6.txt.gz from openai/CLIP, in shared/data/clip beside the repository)',
    );
  }
  const lines = gunzipSync(readFileSync(MERGES_GZ.file)).toString('utf8').split('\n');
  return clipVocabFromBpeMerges(lines);
}

describe('ClipTokenizer with the real CLIP vocabulary', () => {
  let data: TokenizerData;
  let tok: ClipTokenizer;
  beforeAll(() => {
    data = loadClipData();
    tok = ClipTokenizer.fromData(data);
  });

  it('builds the 49,408-token vocabulary with the special tokens last', () => {
    expect(tok.vocabSize).toBe(49408);
    expect([tok.bosId, tok.eosId, tok.padId, tok.unkId]).toEqual([BOS, EOS, EOS, EOS]);
    expect(tok.modelMaxLength).toBe(77);
  });

  it.each([
    ['a photo of a cat', [BOS, 320, 1125, 539, 320, 2368, EOS]],
    ['An astronaut riding a horse', [BOS, 550, 18376, 6765, 320, 4558, EOS]],
    ['hello world', [BOS, 3306, 1002, EOS]],
    ['', [BOS, EOS]],
  ])('encodes %j to the ids of CLIP’s tokenizer', (text, expected) => {
    const e = tok.encode(text);
    expect(Array.from(e.ids.slice(0, e.attentionLength))).toEqual(expected);
    expect(e.truncated).toBe(false);
    expect(e.droppedTokens).toBe(0);
    expect(e.droppedText).toBe('');
  });

  it('pads to 77 with the end token (SD 1.x)', () => {
    const e = tok.encode('');
    expect(e.ids).toBeInstanceOf(Int32Array);
    expect(e.ids.length).toBe(77);
    expect(e.attentionLength).toBe(2);
    expect(Array.from(e.ids)).toEqual([BOS, ...new Array<number>(76).fill(EOS)]);
    expect(Array.from(tok.encode('a photo of a cat').ids.slice(7))).toEqual(new Array<number>(70).fill(EOS));
  });

  it('lower-cases and collapses whitespace', () => {
    expect(Array.from(tok.encode('  A   Photo\nof a CAT ').ids)).toEqual(Array.from(tok.encode('a photo of a cat').ids));
    expect(content(tok, '\ta\u00a0photo\r\n of\u200b a cat\u0085')).toEqual([320, 1125, 539, 320, 2368]);
  });

  it('gives every digit its own token', () => {
    // A lone byte symbol gets no merge, so "d" is the byte table entry "d</w>": 256 + (ord(d) - 33).
    expect(content(tok, '2024')).toEqual([273, 271, 273, 275]);
    expect(content(tok, '0 9')).toEqual([271, 280]);
    expect(content(tok, 'a 1024x768 cat')).toEqual([320, ...content(tok, '1 0 2 4'), ...content(tok, 'x'), ...content(tok, '7 6 8'), 2368]);
  });

  it('splits punctuation from words', () => {
    // ",</w>" = 256 + 11, ".</w>" = 256 + 13, "&</w>" = 256 + 5 in the byte table.
    expect(content(tok, 'a cat, a cat.')).toEqual([320, 2368, 267, 320, 2368, 269]);
    expect(content(tok, 'cat,cat')).toEqual([2368, 267, 2368]);
    // open_clip (OpenAI's vocabulary) in diffusers issue #4153: "! !! !!!" -> 256, 748, 995.
    expect(content(tok, '! !! !!!')).toEqual([256, 748, 995]);
  });

  it('unescapes HTML entities, straightens curly quotes and normalizes to NFC', () => {
    expect(content(tok, 'cat &amp; cat')).toEqual([2368, 261, 2368]);
    expect(content(tok, 'cat &amp;amp; cat')).toEqual([2368, 261, 2368]);
    expect(content(tok, 'it’s a cat')).toEqual(content(tok, "it's a cat"));
    expect(content(tok, "it's")).toHaveLength(2); // "it" and the contraction "'s"
    expect(content(tok, 'cafe\u0301')).toEqual(content(tok, 'caf\u00e9'));
  });

  it('maps special-token text in a prompt to the special id, as transformers does', () => {
    expect(content(tok, 'a <|endoftext|> cat')).toEqual([320, EOS, 2368]);
    expect(content(tok, 'a <|ENDOFTEXT|> cat')).toEqual([320, EOS, 2368]);
  });

  it('keeps exactly 75 content tokens without truncating', () => {
    const e = tok.encode('a photo of a cat '.repeat(15));
    expect(e.attentionLength).toBe(77);
    expect(e.truncated).toBe(false);
    expect(e.ids[75]).toBe(2368);
    expect(e.ids[76]).toBe(EOS);
  });

  it('truncates a long prompt to 75 content tokens and reports what was dropped', () => {
    const e = tok.encode('a photo of a cat '.repeat(20)); // 100 content tokens
    const kept = Array.from(e.ids.slice(1, 76));
    expect(kept).toEqual(Array.from({ length: 15 }, () => [320, 1125, 539, 320, 2368]).flat());
    expect(e.ids[0]).toBe(BOS);
    expect(e.ids[76]).toBe(EOS);
    expect(e.attentionLength).toBe(77);
    expect(e.truncated).toBe(true);
    expect(e.droppedTokens).toBe(25);
    expect(e.droppedText).toBe('a photo of a cat '.repeat(5).trim());
  });

  it('agrees with a literal transcription of CLIP’s bpe() on random words', () => {
    const ranks = new Map(data.merges.map((m, i) => [m, i]));
    const vocab = data.vocab as Map<string, number>;
    // openai/CLIP simple_tokenizer.bpe, step by step: lowest-ranked pair, merge all, repeat.
    const reference = (word: string): number[] => {
      let w = [...word.slice(0, -1)].concat(word.slice(-1) + '</w>');
      for (;;) {
        const pairs = w.slice(1).map((b, i) => `${w[i]} ${b}`);
        const known = pairs.filter((p) => ranks.has(p));
        if (known.length === 0) break;
        const [first, second] = known.reduce((x, y) => (ranks.get(x)! <= ranks.get(y)! ? x : y)).split(' ');
        const next: string[] = [];
        for (let i = 0; i < w.length;) {
          if (w[i] === first && w[i + 1] === second && i < w.length - 1) {
            next.push(first! + second!);
            i += 2;
          } else next.push(w[i++]!);
        }
        w = next;
      }
      return w.map((s) => vocab.get(s)!);
    };
    fc.assert(
      fc.property(fc.stringMatching(/^[aeinorst]{1,40}$/), (word) => {
        expect(tok.tokenize(word)).toEqual(reference(word));
      }),
      { numRuns: 300, seed: 1 },
    );
  });

  it('decodes ids back to the cleaned prompt, skipping special tokens', () => {
    expect(tok.decode(tok.encode('  A Photo of a CAT, at night.').ids)).toBe('a photo of a cat, at night.');
    expect(tok.decode(tok.encode("it's 2024").ids)).toBe("it's 2 0 2 4");
    expect(tok.decode(tok.encode('café 東京 🐱').ids)).toBe('café 東京 🐱');
    expect(() => tok.decode([49408])).toThrow(/id 49408 is not in the vocabulary \(49408 tokens\)/);
  });

  it('pads with "!" (id 0) and splits every "!" out as the pad token for SD 2.x', () => {
    const sd2 = ClipTokenizer.fromData({ ...data, padToken: '!' });
    const e = sd2.encode('! !! !!!');
    // transformers' output for stabilityai's SD 2/XL tokenizer in diffusers issue #4153.
    expect(Array.from(e.ids)).toEqual([BOS, 0, 0, 0, 0, 0, 0, EOS, ...new Array<number>(69).fill(0)]);
    expect(Array.from(sd2.encode('a photo of a cat').ids.slice(5, 10))).toEqual([2368, EOS, 0, 0, 0]);
  });

  describe('written to a folder and loaded back', () => {
    let dir: string;
    beforeAll(async () => {
      dir = await mkdtemp(path.join(os.tmpdir(), 't2i-tokenizer-'));
      await writeTokenizerDirectory(dir, data);
    });
    afterAll(async () => {
      await rm(dir, { recursive: true, force: true });
    });

    it('writes the four files in transformers’ layout', async () => {
      const merges = (await readFile(path.join(dir, 'merges.txt'), 'utf8')).split('\n');
      expect(merges[0]).toBe('#version: 0.2');
      expect(merges[1]).toBe('i n');
      expect(merges.length).toBe(48894 + 2); // header, merges, trailing newline
      const vocab = JSON.parse(await readFile(path.join(dir, 'vocab.json'), 'utf8')) as Record<string, number>;
      expect(Object.keys(vocab)).toHaveLength(49408);
      expect(vocab['a</w>']).toBe(320);
      expect(vocab['<|endoftext|>']).toBe(EOS);
      const config = JSON.parse(await readFile(path.join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
      expect(config).toMatchObject({ tokenizer_class: 'CLIPTokenizer', model_max_length: 77, pad_token: '<|endoftext|>' });
      const specials = JSON.parse(await readFile(path.join(dir, 'special_tokens_map.json'), 'utf8')) as Record<string, unknown>;
      expect(specials['bos_token']).toMatchObject({ content: '<|startoftext|>' });
    });

    it('encodes identically after fromDirectory', async () => {
      const loaded = await ClipTokenizer.fromDirectory(dir);
      expect(loaded.vocabSize).toBe(49408);
      for (const text of ['a photo of a cat', 'An astronaut riding a horse, 4k, trending!!', 'a photo of a cat '.repeat(20)]) {
        expect(loaded.encode(text)).toEqual(tok.encode(text));
      }
    });
  });
});

describe('ClipTokenizer with a hand-made vocabulary', () => {
  const bytes = ['a', 'b', 'c', '!', '<|startoftext|>', '<|endoftext|>'];
  const tokens = [...bytes, 'a</w>', 'b</w>', 'c</w>', '!</w>', 'ab', 'bc</w>', 'abc</w>'];
  const vocab = Object.fromEntries(tokens.map((t, i) => [t, i]));

  it('merges the lowest-ranked pair first', () => {
    const abFirst = ClipTokenizer.fromData({ vocab, merges: ['a b', 'b c</w>'], modelMaxLength: 8 });
    const bcFirst = ClipTokenizer.fromData({ vocab, merges: ['b c</w>', 'a b'], modelMaxLength: 8 });
    expect(content(abFirst, 'abc')).toEqual([vocab['ab'], vocab['c</w>']]);
    expect(content(bcFirst, 'abc')).toEqual([vocab['a'], vocab['bc</w>']]);
    const full = ClipTokenizer.fromData({ vocab, merges: ['a b', 'ab c</w>'], modelMaxLength: 8 });
    // In "abcx" the c is not at the word end, so only "a b" applies; x is unknown (unk = eos).
    expect(content(full, 'abc abcx')).toEqual([vocab['abc</w>'], vocab['ab'], vocab['c'], vocab['<|endoftext|>']]);
  });

  it('maps symbols missing from the vocabulary to the unknown token', () => {
    const tok = ClipTokenizer.fromData({ vocab, merges: [], modelMaxLength: 8, unkToken: '!' });
    expect(content(tok, 'a z')).toEqual([vocab['a</w>'], vocab['!']]);
  });

  it('honours model_max_length for padding and truncation', () => {
    const tok = ClipTokenizer.fromData({ vocab, merges: [], modelMaxLength: 5, padToken: '!' });
    const e = tok.encode('a b c a');
    expect(Array.from(e.ids)).toEqual([4, 6, 7, 8, 5]);
    expect(e.droppedTokens).toBe(1);
    expect(e.droppedText).toBe('a');
    expect(Array.from(tok.encode('a').ids)).toEqual([4, 6, 5, 3, 3]);
  });

  it('round-trips a small tokenizer through a folder', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 't2i-tokenizer-small-'));
    try {
      const data = { vocab, merges: ['a b', 'ab c</w>'], modelMaxLength: 6, padToken: '!' };
      await writeTokenizerDirectory(dir, data);
      const loaded = await ClipTokenizer.fromDirectory(dir);
      expect(loaded.modelMaxLength).toBe(6);
      expect(loaded.padId).toBe(3);
      expect(loaded.encode('abc a')).toEqual(ClipTokenizer.fromData(data).encode('abc a'));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('rejects bad in-memory data with what was expected', () => {
    expect(() => ClipTokenizer.fromData({ vocab: {}, merges: [] })).toThrow(/vocab: .*got an empty one/);
    expect(() => ClipTokenizer.fromData({ vocab: { a: -1 }, merges: [] })).toThrow(/"a" maps to -1/);
    expect(() => ClipTokenizer.fromData({ vocab, merges: ['a b c'] })).toThrow(/merges\[0\]: expected a merge "left right"/);
    expect(() => ClipTokenizer.fromData({ vocab, merges: [], padToken: '<pad>' })).toThrow(/pad_token "<pad>" is not in the vocabulary/);
    expect(() => ClipTokenizer.fromData({ vocab: { '': 0, ...vocab }, merges: [], padToken: '' })).toThrow(/pad_token must not be empty/);
    expect(() => ClipTokenizer.fromData({ vocab: { a: 0 }, merges: [] })).toThrow(
      /tokenizer options \(default\): bos_token "<\|startoftext\|>" is not in the vocabulary/,
    );
    expect(() => ClipTokenizer.fromData({ vocab, merges: [], modelMaxLength: 2 })).toThrow(/model_max_length must be an integer from 3 to 4096, got 2/);
  });
});

describe('ClipTokenizer.fromDirectory errors', () => {
  const vocab = { a: 0, b: 1, 'a</w>': 2, 'b</w>': 3, ab: 4, '<|startoftext|>': 5, '<|endoftext|>': 6 };
  let root: string;
  let n = 0;
  beforeAll(async () => {
    root = await mkdtemp(path.join(os.tmpdir(), 't2i-tokenizer-errors-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  /** A tokenizer folder with the given files; `undefined` leaves a file out. */
  async function folder(files: Record<string, string | undefined>): Promise<string> {
    const dir = path.join(root, `case-${n++}`, 'tokenizer');
    await mkdir(dir, { recursive: true });
    const all: Record<string, string | undefined> = {
      'vocab.json': JSON.stringify(vocab),
      'merges.txt': '#version: 0.2\na b\n',
      ...files,
    };
    for (const [name, text] of Object.entries(all)) if (text !== undefined) await writeFile(path.join(dir, name), text);
    return dir;
  }

  it('loads an SD 1.5-style folder with AddedToken objects, and one without the optional files', async () => {
    const added = (content: string) => ({ __type: 'AddedToken', content, lstrip: false, normalized: true, rstrip: false });
    const dir = await folder({
      'tokenizer_config.json': JSON.stringify({
        bos_token: added('<|startoftext|>'),
        eos_token: added('<|endoftext|>'),
        unk_token: added('<|endoftext|>'),
        pad_token: '<|endoftext|>',
        model_max_length: 8,
        tokenizer_class: 'CLIPTokenizer',
      }),
      'special_tokens_map.json': JSON.stringify({ bos_token: { content: '<|startoftext|>' }, pad_token: 'a</w>' }),
    });
    const tok = await ClipTokenizer.fromDirectory(dir);
    // "ab" is a + b</w> (the merge "a b" never applies at a word end), then "a</w>"; pad a</w>.
    expect(Array.from(tok.encode('ab a').ids)).toEqual([5, 0, 3, 2, 6, 2, 2, 2]);
    expect([tok.bosId, tok.eosId, tok.padId, tok.modelMaxLength]).toEqual([5, 6, 2, 8]);

    const bare = await ClipTokenizer.fromDirectory(await folder({}));
    expect([bare.bosId, bare.eosId, bare.padId, bare.modelMaxLength]).toEqual([5, 6, 6, 77]);
  });

  it.each<[string, Record<string, string | undefined>, RegExp]>([
    ['a missing vocab.json', { 'vocab.json': undefined }, /tokenizer[/\\]vocab\.json: file not found/],
    ['a vocab.json that is not JSON', { 'vocab.json': '{"a": 0,' }, /vocab\.json: invalid JSON/],
    ['a vocab.json array', { 'vocab.json': '["a"]' }, /vocab\.json: expected a JSON object mapping token to id, got an array/],
    ['a vocab.json with a string id', { 'vocab.json': '{"a": "0"}' }, /vocab\.json: expected .*"a" maps to "0"/],
    ['a missing merges.txt', { 'merges.txt': undefined }, /tokenizer[/\\]merges\.txt: file not found/],
    ['a malformed merge line', { 'merges.txt': '#version: 0.2\na b\nab\n' }, /merges\.txt:3: expected a merge "left right", got "ab"/],
    ['a config that is an array', { 'tokenizer_config.json': '[]' }, /tokenizer_config\.json: expected a JSON object, got an array/],
    [
      'an unusable model_max_length',
      { 'tokenizer_config.json': '{"model_max_length": 1e30}' },
      /tokenizer_config\.json: model_max_length must be an integer from 3 to 4096, got 1e\+30/,
    ],
    [
      'a special token of the wrong type',
      { 'special_tokens_map.json': '{"pad_token": 5}' },
      /special_tokens_map\.json: pad_token must be a string or an object with a string "content", got number 5/,
    ],
    [
      'a special token missing from the vocabulary',
      { 'tokenizer_config.json': '{"pad_token": "!"}', 'special_tokens_map.json': '{"pad_token": "<pad>"}' },
      /special_tokens_map\.json: pad_token "<pad>" is not in the vocabulary/,
    ],
    [
      'a special token missing from the vocabulary, set in tokenizer_config.json',
      { 'tokenizer_config.json': '{"unk_token": {"content": "<unk>"}}', 'special_tokens_map.json': '{}' },
      /tokenizer_config\.json: unk_token "<unk>" is not in the vocabulary/,
    ],
  ])('names the file and the expectation for %s', async (_what, files, message) => {
    await expect(ClipTokenizer.fromDirectory(await folder(files))).rejects.toThrow(message);
  });

  it('names the folder when it does not exist', async () => {
    const missing = path.join(root, 'nowhere', 'tokenizer');
    await expect(ClipTokenizer.fromDirectory(missing)).rejects.toThrow(`${path.join(missing, 'vocab.json')}: file not found`);
  });
});

describe('clipVocabFromBpeMerges', () => {
  it('rejects a cut-short merges file', () => {
    expect(() => clipVocabFromBpeMerges(['#version: 0.2', 'i n'])).toThrow(/expected a header line and 48894 merges, got 2 lines/);
  });
});
