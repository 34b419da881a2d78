/** Small DOM helpers: the page builds its elements with these, never from HTML strings (no markup injection from prompts). */

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | null | undefined>;

/** An element with attributes (false, null and undefined leave one out; true sets it empty) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    el.setAttribute(name, value === true ? '' : String(value));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(typeof c === 'number' ? String(c) : c);
  return el;
}

/** The element with this id, of this type; a page without it is a build error worth failing loudly on. */
export function byId<T extends HTMLElement = HTMLElement>(id: string, type?: new () => T): T {
  const el = document.getElementById(id);
  if (!el || (type && !(el instanceof type))) throw new Error(`the page has no #${id}${type ? ` (${type.name})` : ''}`);
  return el as T;
}

/** Shows or hides an element (the hidden attribute: hidden from assistive technology too). */
export function show(el: HTMLElement, visible: boolean): void {
  el.hidden = !visible;
}

/** "about 3 s", "about 1 min 20 s": what is left of a job, from milliseconds. */
export function duration(ms: number): string {
  if (ms < 1000) return 'under a second';
  const s = Math.round(ms / 1000);
  if (s < 60) return `about ${s} s`;
  return `about ${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
}

/** A time as people read it, in their own locale and zone. */
export function when(iso: string): string {
  return new Date(iso).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

/** Object URLs made for one purpose, released together (each holds its bytes until revoked). */
export class BlobUrls {
  private readonly urls: string[] = [];

  make(blob: Blob): string {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  revokeAll(): void {
    for (const u of this.urls.splice(0)) URL.revokeObjectURL(u);
  }
}
