/**
 * The text side of CLIP's tokenizer: the clean-up a prompt goes through before BPE, the
 * pre-tokenizer's split, GPT-2's reversible byte <-> character table every BPE symbol is made of,
 * and the way ids become text again.
 */

// ---------------------------------------------------------------------------------------------
// GPT-2's reversible byte <-> printable character table. Every symbol BPE sees is one of these
// 256 characters, so a token never contains a raw space or control character.

const BYTE_TO_CHAR: readonly string[] = buildByteToChar();
const CHAR_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

function printableBytes(): number[] {
  const bytes: number[] = [];
  const ranges: Array<[number, number]> = [
    [0x21, 0x7e], // '!'..'~'
    [0xa1, 0xac], // '¡'..'¬'
    [0xae, 0xff], // '®'..'ÿ'
  ];
  for (const [lo, hi] of ranges) for (let b = lo; b <= hi; b++) bytes.push(b);
  return bytes;
}

function buildByteToChar(): string[] {
  const table = new Array<string>(256);
  const printable = new Set(printableBytes());
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    // Bytes that would be whitespace/control are moved above U+00FF, in byte order.
    table[b] = String.fromCharCode(printable.has(b) ? b : 256 + shifted++);
  }
  return table;
}

/** The 256 byte symbols in CLIP's vocabulary order: printable ranges first, then the rest. */
export function byteSymbolsInVocabOrder(): string[] {
  const printable = printableBytes();
  const set = new Set(printable);
  const rest: number[] = [];
  for (let b = 0; b < 256; b++) if (!set.has(b)) rest.push(b);
  return [...printable, ...rest].map((b) => BYTE_TO_CHAR[b]!);
}

const utf8 = new TextEncoder();
const utf8Lenient = new TextDecoder('utf-8', { fatal: false }); // like errors="replace"

export function byteEncode(text: string): string {
  let out = '';
  for (const b of utf8.encode(text)) out += BYTE_TO_CHAR[b]!;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Text clean-up (ftfy + basic_clean + whitespace_clean + lower, approximated).

// A Map, not an object literal: "&constructor;" must not find Object.prototype members.
const NAMED_ENTITIES: ReadonlyMap<string, string> = new Map([
  ['amp', '&'],
  ['lt', '<'],
  ['gt', '>'],
  ['quot', '"'],
  ['apos', "'"],
  ['nbsp', '\u00a0'],
]);

/** Common HTML entities only; CLIP's basic_clean runs html.unescape twice ("&amp;lt;" -> "<"). */
function unescapeHtml(text: string): string {
  return text.replace(/&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]+);/g, (whole, body: string) => {
    if (body[0] !== '#') return NAMED_ENTITIES.get(body) ?? whole;
    const cp = body[1] === 'x' || body[1] === 'X' ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
    const valid = cp > 0 && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff);
    return valid ? String.fromCodePoint(cp) : '\ufffd';
  });
}

export function cleanText(text: string): string {
  return (
    unescapeHtml(unescapeHtml(text))
      .normalize('NFC')
      .replace(/[\u2018\u2019\u201a\u201b]/g, "'") // ftfy's uncurl_quotes: "it’s" must split like "it's"
      .replace(/[\u201c\u201d\u201e\u201f]/g, '"')
      // Control and zero-width characters vanish (ftfy's remove_control_chars); \t \n \v \f \r
      // and NEL stay, as whitespace. Matching control characters is this pattern's purpose.
      // eslint-disable-next-line no-control-regex
      .replace(/[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b-\u200d\u2060\ufeff]/g, '')
      .replace(/[\s\x85]+/g, ' ') // Python's \s also covers NEL (U+0085); JS's does not
      .trim()
      .toLowerCase()
  );
}

/** CLIP's pre-tokenizer: special tokens, contractions, letter runs, single digits, symbol runs. */
export const CLIP_SPLIT = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/giu;

/** transformers' decode clean-up (clean_up_tokenization_spaces=True). */
export function cleanUpTokenizationSpaces(text: string): string {
  return text
    .replaceAll(' .', '.')
    .replaceAll(' ?', '?')
    .replaceAll(' !', '!')
    .replaceAll(' ,', ',')
    .replaceAll(" ' ", "'")
    .replaceAll(" n't", "n't")
    .replaceAll(" 'm", "'m")
    .replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve")
    .replaceAll(" 're", "'re");
}

/** BPE symbols back to text: each symbol character is one byte, decoded as UTF-8 (errors="replace"). */
export function symbolsToText(joined: string): string {
  const bytes: number[] = [];
  for (const ch of joined) {
    const b = CHAR_TO_BYTE.get(ch);
    if (b !== undefined) bytes.push(b);
    else bytes.push(...utf8.encode(ch)); // a hand-made vocab may hold characters outside the table
  }
  return utf8Lenient.decode(Uint8Array.from(bytes));
}
