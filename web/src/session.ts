/**
 * Where the API key lives: in this browser's storage for this origin, never in a URL, a cookie
 * or a log. "Keep me signed in" puts it in localStorage (pasted once, there in every tab and
 * after a restart); otherwise sessionStorage (gone when the tab closes: for a shared computer).
 * Either is readable by any script of this origin, which is why the page's content-security
 * policy runs only the page's own files, and nothing inline or from other hosts. Sign-out removes
 * it from both. Sent only in the Authorization header, to this origin.
 */

const ITEM = 't2i.apiKey';

/** What `t2i keys create` prints: t2i_, an 8-hex-digit prefix, _, a 64-hex-digit secret. */
export const KEY_FORMAT = /^t2i_[0-9a-f]{8}_[0-9a-f]{64}$/;

export function savedKey(): string | null {
  return localStorage.getItem(ITEM) ?? sessionStorage.getItem(ITEM);
}

export function saveKey(key: string, remember: boolean): void {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(ITEM, key);
}

export function forgetKey(): void {
  localStorage.removeItem(ITEM);
  sessionStorage.removeItem(ITEM);
}
