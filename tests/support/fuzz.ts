import fc from 'fast-check';

/**
 * Request bodies for fuzzing POST routes, over a wide alphabet: strings of any UTF-16 code units
 * (control characters, NUL, lone surrogates, noncharacters, astral symbols), numbers JSON can
 * write but JavaScript cannot hold (1e400, 40-digit integers), deep nesting, hostile keys, and
 * text that is not JSON at all. Each is the raw body text, sent as application/json.
 */

/** Any UTF-16 code units, lone surrogates included, and whole code points up to U+10FFFF. */
export const wideString = (maxLength = 40) =>
  fc.oneof(
    fc.string({ unit: 'binary', maxLength }),
    fc.string({ unit: 'grapheme', maxLength }),
    fc.constantFrom(
      '\u0000',
      'a\u0000b',
      '\ud800',
      'x\udfff',
      '\u0007\u001b[31m',
      '\u007f\u0085\u009f',
      '\ufffe\uffff',
      '\u202e',
      '😀\ud83d',
      'é'.normalize('NFD'),
    ),
  );

const hostileKey = fc.oneof(fc.constantFrom('__proto__', 'constructor', 'toString', 'prototype', '', 'prompt\u0000'), wideString(12));

/** A JSON value whose strings use the wide alphabet. */
const wideJson = fc.jsonValue({ maxDepth: 3, stringUnit: 'binary' });

/** Numbers as raw JSON text: too big or too small for a double, or too long for an integer. */
const rawNumber = fc.constantFrom(
  '1e400',
  '-1e400',
  '1e-400',
  '123456789012345678901234567890123456789',
  '-0',
  '0.0000000000000000000001',
  '4294967296',
  '9007199254740993',
);

/** `depth` nested arrays or objects around a value. */
const deep = fc.record({ depth: fc.integer({ min: 10, max: 20_000 }), kind: fc.constantFrom('[', '{"a":') }).map(({ depth, kind }) => {
  const close = kind === '[' ? ']' : '}';
  return kind.repeat(depth) + '1' + close.repeat(depth);
});

export function hostileBodies<T extends Record<string, unknown>>(valid: T): fc.Arbitrary<string> {
  const keys = Object.keys(valid);
  return fc.oneof(
    wideJson.map((v) => JSON.stringify(v)),
    fc.dictionary(hostileKey, wideJson, { maxKeys: 6 }).map((v) => JSON.stringify(v)),
    // A valid body with one field replaced by something hostile.
    fc
      .record({ key: fc.constantFrom(...keys, 'extra'), value: fc.oneof(wideString(3000), wideJson, fc.double(), fc.integer(), fc.bigInt().map(String)) })
      .map(({ key, value }) => JSON.stringify({ ...valid, [key]: value })),
    // A valid body with a number field written as raw text JSON allows but doubles do not.
    fc
      .record({ key: fc.constantFrom(...keys), num: rawNumber })
      .map(({ key, num }) => JSON.stringify({ ...valid, [key]: 0 }).replace(`"${key}":0`, `"${key}":${num}`)),
    deep,
    // Not JSON at all.
    wideString(200),
  );
}
