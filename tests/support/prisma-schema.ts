/**
 * The drift check of tests/integration/db-schema.test.ts: a minimal schema.prisma reader, just
 * enough for the constructs this project uses and loud about the rest, and a description of a
 * live database from pg_catalog in the same one-line-per-fact form, so that a difference reads as
 * a short list of lines.
 *
 * Why hand-written: Prisma's own check (`prisma migrate diff`) needs the native schema engine,
 * which cannot be downloaded here.
 */
import type pg from 'pg';

interface ExpectedColumn {
  name: string;
  type: string;
  notNull: boolean;
  default: string | null;
}
interface ExpectedTable {
  name: string;
  columns: ExpectedColumn[];
  pk: { name: string; columns: string[] };
  indexes: string[];
  /** Foreign keys as one line each, in the form describeDatabase prints them. */
  foreignKeys: string[];
}
interface ExpectedSchema {
  enums: Map<string, string[]>;
  tables: ExpectedTable[];
}

const unsupported = (what: string): never => {
  throw new Error(
    `drift check: schema.prisma uses ${what}, which the small parser in tests/support/prisma-schema.ts does not understand yet; extend parseSchema there`,
  );
};

/** Drops // comments (including /// docs) outside string literals. */
function stripComments(text: string): string {
  return text
    .split('\n')
    .map((line) => {
      let inStr = false;
      for (let i = 0; i < line.length; i++) {
        const c = line[i];
        if (c === '"' && line[i - 1] !== '\\') inStr = !inStr;
        else if (!inStr && c === '/' && line[i + 1] === '/') return line.slice(0, i);
      }
      return line;
    })
    .join('\n');
}

interface Attr {
  name: string;
  args: string | null;
}

/** Splits `@id @default(dbgenerated("x()")) @db.Uuid` into attributes with their raw arguments. */
function parseAttrs(text: string): Attr[] {
  const attrs: Attr[] = [];
  let i = 0;
  while (i < text.length) {
    if (/\s/.test(text[i]!)) {
      i++;
      continue;
    }
    if (text[i] !== '@') unsupported(`unexpected text "${text.slice(i)}"`);
    const m = /^@@?[\w.]+/.exec(text.slice(i))!;
    i += m[0].length;
    let args: string | null = null;
    if (text[i] === '(') {
      let depth = 0;
      let inStr = false;
      const start = i;
      for (; i < text.length; i++) {
        const c = text[i];
        if (c === '"' && text[i - 1] !== '\\') inStr = !inStr;
        if (inStr) continue;
        if (c === '(') depth++;
        if (c === ')' && --depth === 0) break;
      }
      args = text.slice(start + 1, i);
      i++;
    }
    attrs.push({ name: m[0], args });
  }
  return attrs;
}

/** Splits on top-level commas (not inside brackets, parentheses or strings). */
function splitTop(text: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let inStr = false;
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === '"' && text[i - 1] !== '\\') inStr = !inStr;
    if (!inStr && (c === '(' || c === '[')) depth++;
    if (!inStr && (c === ')' || c === ']')) depth--;
    if (!inStr && depth === 0 && c === ',') {
      parts.push(cur.trim());
      cur = '';
    } else cur += c;
  }
  if (cur.trim()) parts.push(cur.trim());
  return parts;
}

const unquote = (s: string) => JSON.parse(s.trim()) as string;

/** Prisma's scalar -> PostgreSQL type, as format_type() prints it. */
function columnType(prismaType: string, dbAttr: Attr | undefined, enumDbName: string | undefined): string {
  if (enumDbName) return enumDbName;
  if (dbAttr) {
    const native = dbAttr.name.slice('@db.'.length);
    const arg = dbAttr.args?.trim();
    switch (native) {
      case 'Uuid':
        return 'uuid';
      case 'Text':
        return 'text';
      case 'VarChar':
        return arg ? `character varying(${arg})` : 'character varying';
      case 'Timestamptz':
        return `timestamp${arg ? `(${arg})` : ''} with time zone`;
      case 'Timestamp':
        return `timestamp${arg ? `(${arg})` : ''} without time zone`;
      case 'Date':
        return 'date';
      case 'Integer':
        return 'integer';
      case 'BigInt':
        return 'bigint';
      case 'DoublePrecision':
        return 'double precision';
      default:
        return unsupported(`@db.${native}`);
    }
  }
  const defaults: Record<string, string> = {
    String: 'text',
    Int: 'integer',
    BigInt: 'bigint',
    Float: 'double precision',
    Boolean: 'boolean',
    DateTime: 'timestamp(3) without time zone',
    Json: 'jsonb',
    Bytes: 'bytea',
    Decimal: 'numeric(65,30)',
  };
  return defaults[prismaType] ?? unsupported(`the field type ${prismaType} (a relation?)`);
}

/** Prisma's @default(...) -> the default expression pg_get_expr() prints. */
function columnDefault(args: string, type: string, enumDbName: string | undefined): string {
  const a = args.trim();
  let m: RegExpExecArray | null;
  if ((m = /^dbgenerated\((".*")\)$/.exec(a))) return unquote(m[1]!);
  if (a === 'now()') return 'CURRENT_TIMESTAMP';
  if (/^-?\d+(\.\d+)?$/.test(a)) return a;
  if (a === 'true' || a === 'false') return a;
  if (/^\w+$/.test(a) && enumDbName) return `'${a}'::${enumDbName}`;
  if (a.startsWith('"')) return `'${unquote(a).replaceAll("'", "''")}'::${type === 'text' ? 'text' : type}`;
  return unsupported(`@default(${a})`);
}

/** Prisma's default index names: {table}_{columns}_idx / _key / _pkey, at most 63 characters. */
function prismaName(table: string, columns: string[], suffix: string): string {
  const name = [table, ...columns, suffix].join('_');
  if (name.length > 63) unsupported(`an index name longer than 63 characters (${name}); Prisma truncates those`);
  return name;
}

export function parseSchema(text: string): ExpectedSchema {
  const src = stripComments(text);
  const blocks = [...src.matchAll(/^\s*(model|enum|generator|datasource|view|type)\s+(\w+)\s*\{([\s\S]*?)^\s*\}/gm)];
  const enums = new Map<string, string[]>();
  const enumDbNames = new Map<string, string>();
  for (const [, kind, name, body] of blocks) {
    if (kind === 'view' || kind === 'type') unsupported(`a ${kind} block`);
    if (kind !== 'enum') continue;
    const values: string[] = [];
    let dbName = name!;
    for (const line of body!
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean)) {
      if (line.startsWith('@@map(')) dbName = unquote(line.slice(6, -1));
      else if (/^\w+$/.test(line)) values.push(line);
      else unsupported(`the enum line "${line}"`);
    }
    enums.set(dbName, values);
    enumDbNames.set(name!, dbName);
  }

  const tables: ExpectedTable[] = [];
  const modelTables = new Map<string, string>();
  for (const [, kind, modelName, body] of blocks) {
    if (kind !== 'model') continue;
    const mapped = /^\s*@@map\((".*?")\)/m.exec(body!);
    modelTables.set(modelName!, mapped ? unquote(mapped[1]!) : modelName!);
  }
  for (const [, kind, modelName, body] of blocks) {
    if (kind !== 'model') continue;
    const relations: Array<{ fields: string[]; model: string; references: string[]; onDelete: string }> = [];
    const fields: Array<{ name: string; column: string; type: string; optional: boolean; attrs: Attr[]; enumDb: string | undefined }> = [];
    const blockAttrs: Attr[] = [];
    for (const line of body!
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean)) {
      if (line.startsWith('@@')) {
        blockAttrs.push(...parseAttrs(line));
        continue;
      }
      const m = /^(\w+)\s+(\w+)(\?|\[\])?\s*(.*)$/.exec(line) ?? unsupported(`the model line "${line}"`);
      const attrs = parseAttrs(m[4]!);
      if (modelTables.has(m[2]!)) {
        // A relation: the back side (a list, or no @relation) has no column; the owning side
        // names its foreign key, which Prisma creates as {table}_{columns}_fkey.
        const rel = attrs.find((a) => a.name === '@relation');
        if (m[3] === '[]' || !rel) continue;
        const named: Record<string, string | undefined> = Object.fromEntries(
          splitTop(rel.args!).map((part): [string, string | undefined] => {
            const [key = '', value] = part.split(':').map((x) => x.trim());
            return [key, value];
          }),
        );
        const list = (v: string | undefined) =>
          (v ?? unsupported(`@relation(${rel.args}) without fields and references`))
            .replace(/^\[|\]$/g, '')
            .split(',')
            .map((x) => x.trim());
        const actions: Record<string, string | undefined> = { Cascade: 'CASCADE', Restrict: 'RESTRICT', SetNull: 'SET NULL', NoAction: 'NO ACTION' };
        const onDelete = actions[named.onDelete ?? 'Restrict'];
        if (!onDelete) unsupported(`onDelete: ${named.onDelete}`);
        relations.push({ fields: list(named.fields), model: m[2]!, references: list(named.references), onDelete: onDelete! });
        continue;
      }
      if (m[3] === '[]') unsupported(`the list field ${m[1]}`);
      const map = attrs.find((a) => a.name === '@map');
      fields.push({
        name: m[1]!,
        column: map ? unquote(map.args!) : m[1]!,
        type: m[2]!,
        optional: m[3] === '?',
        attrs,
        enumDb: enumDbNames.get(m[2]!),
      });
    }
    const tableMap = blockAttrs.find((a) => a.name === '@@map');
    const table = tableMap ? unquote(tableMap.args!) : modelName!;
    const columnOf = (fieldName: string) => fields.find((f) => f.name === fieldName)?.column ?? unsupported(`an index on unknown field ${fieldName}`);

    const columns = fields.map((f): ExpectedColumn => {
      for (const a of f.attrs) {
        if (!['@map', '@id', '@default', '@updatedAt'].includes(a.name) && !a.name.startsWith('@db.')) unsupported(`${a.name} on ${modelName}.${f.name}`);
      }
      const type = columnType(
        f.type,
        f.attrs.find((a) => a.name.startsWith('@db.')),
        f.enumDb,
      );
      const def = f.attrs.find((a) => a.name === '@default');
      return { name: f.column, type, notNull: !f.optional, default: def ? columnDefault(def.args!, type, f.enumDb) : null };
    });

    const idField = fields.filter((f) => f.attrs.some((a) => a.name === '@id'));
    const compoundId = blockAttrs.find((a) => a.name === '@@id');
    if (idField.length + (compoundId ? 1 : 0) !== 1) unsupported(`${idField.length} @id fields${compoundId ? ' and an @@id' : ''} in ${modelName}`);
    const pkCols = compoundId ? splitTop(compoundId.args!.replace(/^\[|\]$/g, '')).map(columnOf) : [idField[0]!.column];

    const foreignKeys = relations.map((r) => {
      const cols = r.fields.map(columnOf);
      const target = modelTables.get(r.model)!;
      // Referenced columns are named by field; every model here maps its id field to "id".
      return `foreign key ${prismaName(table, cols, 'fkey')} ON ${table} (${cols.join(', ')}) REFERENCES ${target}(${r.references.join(', ')}) ON UPDATE CASCADE ON DELETE ${r.onDelete}`;
    });

    const indexes: string[] = [];
    for (const a of blockAttrs) {
      if (a.name === '@@map' || a.name === '@@id') continue;
      if (a.name !== '@@index' && a.name !== '@@unique') unsupported(`${a.name} in ${modelName}`);
      const [list, ...named] = splitTop(a.args!);
      const cols = splitTop(list!.replace(/^\[|\]$/g, '')).map((item) => {
        const m = /^(\w+)(?:\(sort:\s*(Asc|Desc)\))?$/.exec(item) ?? unsupported(`the index field "${item}"`);
        return { column: columnOf(m[1]!), desc: m[2] === 'Desc' };
      });
      const mapArg = named.find((n) => /^(map|name):/.test(n));
      if (named.some((n) => !/^(map|name):/.test(n))) unsupported(`index arguments ${named.join(', ')}`);
      const unique = a.name === '@@unique';
      const name = mapArg
        ? unquote(mapArg.split(':')[1]!)
        : prismaName(
            table,
            cols.map((c) => c.column),
            unique ? 'key' : 'idx',
          );
      const colSql = cols.map((c) => `${c.column}${c.desc ? ' DESC' : ''}`).join(', ');
      indexes.push(`CREATE ${unique ? 'UNIQUE ' : ''}INDEX ${name} ON public.${table} USING btree (${colSql})`);
    }
    tables.push({ name: table, columns, pk: { name: prismaName(table, [], 'pkey'), columns: pkCols }, indexes, foreignKeys });
  }
  return { enums, tables };
}

/** One comparable line per fact, so a mismatch reads as a short list of differing lines. */
export function describeExpected(s: ExpectedSchema): string[] {
  const lines: string[] = [];
  for (const [name, values] of s.enums) lines.push(`enum ${name} (${values.join(', ')})`);
  for (const t of s.tables) {
    lines.push(`table ${t.name}`);
    for (const c of t.columns) lines.push(`column ${t.name}.${c.name} ${c.type}${c.notNull ? ' NOT NULL' : ' NULL'} DEFAULT ${c.default ?? '-'}`);
    lines.push(`primary key ${t.pk.name} ON ${t.name} (${t.pk.columns.join(', ')})`);
    for (const i of t.indexes) lines.push(`index ${i}`);
    lines.push(...t.foreignKeys);
  }
  return lines.sort();
}

export async function describeDatabase(client: pg.Client): Promise<string[]> {
  const lines: string[] = [];
  const enums = await client.query<{ name: string; values: string[] }>(
    `SELECT t.typname AS name, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text[] AS values
       FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE n.nspname = 'public' GROUP BY t.typname`,
  );
  for (const e of enums.rows) lines.push(`enum ${e.name} (${e.values.join(', ')})`);

  const tables = await client.query<{ name: string }>(
    `SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname <> '_prisma_migrations'`,
  );
  for (const { name } of tables.rows) {
    lines.push(`table ${name}`);
    const cols = await client.query<{ name: string; type: string; notnull: boolean; def: string | null }>(
      `SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull,
              pg_get_expr(d.adbin, d.adrelid) AS def
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped`,
      [`public.${name}`],
    );
    for (const c of cols.rows) lines.push(`column ${name}.${c.name} ${c.type}${c.notnull ? ' NOT NULL' : ' NULL'} DEFAULT ${c.def ?? '-'}`);
    const pk = await client.query<{ name: string; cols: string[] }>(
      `SELECT con.conname AS name,
              array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, ord)
                      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.ord)::text[] AS cols
         FROM pg_constraint con WHERE con.conrelid = $1::regclass AND con.contype = 'p'`,
      [`public.${name}`],
    );
    for (const p of pk.rows) lines.push(`primary key ${p.name} ON ${name} (${p.cols.join(', ')})`);
    const idx = await client.query<{ def: string }>(
      `SELECT pg_get_indexdef(i.indexrelid) AS def FROM pg_index i
        WHERE i.indrelid = $1::regclass AND NOT i.indisprimary`,
      [`public.${name}`],
    );
    for (const i of idx.rows) lines.push(`index ${i.def}`);
    const fks = await client.query<{ name: string; def: string }>(
      `SELECT con.conname AS name, pg_get_constraintdef(con.oid) AS def FROM pg_constraint con
        WHERE con.conrelid = $1::regclass AND con.contype = 'f'`,
      [`public.${name}`],
    );
    for (const f of fks.rows) {
      // pg prints e.g. FOREIGN KEY (image_id) REFERENCES generated_images(id) ON UPDATE CASCADE ON DELETE CASCADE
      const def = f.def.replace(/^FOREIGN KEY \(([^)]*)\) /, '($1) ');
      lines.push(`foreign key ${f.name} ON ${name} ${def}`);
    }
  }
  return lines.sort();
}

export function driftReport(expected: string[], actual: string[]): string {
  const exp = new Set(expected);
  const act = new Set(actual);
  const missing = expected.filter((l) => !act.has(l)).map((l) => `- schema.prisma: ${l}`);
  const extra = actual.filter((l) => !exp.has(l)).map((l) => `+ database:      ${l}`);
  return [...missing, ...extra].join('\n');
}
