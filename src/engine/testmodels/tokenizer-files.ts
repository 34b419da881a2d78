import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ClipTokenizer, clipVocabFromBpeMerges, type TokenizerData, type Vocab } from '../tokenizer.js';

/**
 * Tokenizer folders for the models the project makes itself: a small vocabulary in which each
 * test word is one token, written in the layout transformers' CLIPTokenizer loads.
 */

/**
 * Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json in the
 * layout transformers' `CLIPTokenizer.from_pretrained(dir)` loads. The data is validated by
 * building a tokenizer first, so a written folder always loads back.
 */
export async function writeTokenizerDirectory(dir: string, data: TokenizerData): Promise<void> {
  const tokenizer = ClipTokenizer.fromData(data);
  const vocab = data.vocab;
  const entries: Array<[string, number]> = isMap(vocab) ? [...vocab] : Object.entries(vocab);
  const byId = entries.sort((x, y) => x[1] - y[1]);
  const added = (content: string) => ({ content, lstrip: false, normalized: true, rstrip: false, single_word: false });
  const json = (name: string, value: unknown) => writeFile(path.join(dir, name), JSON.stringify(value, null, 2) + '\n', 'utf8');

  await mkdir(dir, { recursive: true });
  await json('vocab.json', Object.fromEntries(byId));
  const merges = data.merges.map((m) => m.trim().split(/\s+/).join(' '));
  await writeFile(path.join(dir, 'merges.txt'), ['#version: 0.2', ...merges].join('\n') + '\n', 'utf8');
  await json('tokenizer_config.json', {
    tokenizer_class: 'CLIPTokenizer',
    model_max_length: tokenizer.modelMaxLength,
    do_lower_case: true,
    errors: 'replace',
    add_prefix_space: false,
    clean_up_tokenization_spaces: true,
    bos_token: tokenizer.bosToken,
    eos_token: tokenizer.eosToken,
    pad_token: tokenizer.padToken,
    unk_token: tokenizer.unkToken,
  });
  await json('special_tokens_map.json', {
    bos_token: added(tokenizer.bosToken),
    eos_token: added(tokenizer.eosToken),
    pad_token: added(tokenizer.padToken),
    unk_token: added(tokenizer.unkToken),
  });
}

function isMap(vocab: Vocab): vocab is ReadonlyMap<string, number> {
  return vocab instanceof Map;
}

/**
 * A small CLIP-format BPE vocabulary in which each word is one token: the 512 byte symbols
 * plus a chain of merges per word, added only where the merges so far do not already join it.
 * Any other text still tokenizes, byte by byte.
 */
export function wordVocabulary(words: string[]): { vocab: Map<string, number>; merges: string[] } {
  const merges: string[] = [];
  const build = () => clipVocabFromBpeMerges(['#version: 0.2', ...merges], merges.length);
  for (const word of words) {
    const { vocab } = build();
    const byId = new Map([...vocab].map(([tok, id]) => [id, tok]));
    const pieces = ClipTokenizer.fromData(build())
      .tokenize(word)
      .map((id) => byId.get(id)!);
    let joined = pieces[0]!;
    for (const piece of pieces.slice(1)) {
      merges.push(`${joined} ${piece}`);
      joined += piece;
    }
  }
  const result = build();
  const check = ClipTokenizer.fromData(result);
  for (const word of words) {
    if (check.tokenize(word).length !== 1) throw new Error(`word vocabulary: "${word}" does not tokenize to a single token`);
  }
  return result;
}
