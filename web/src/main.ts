import './styles.css';
import { Api, ApiError } from './api.js';
import { byId, show } from './dom.js';
import { PromptForm } from './form.js';
import { Gallery } from './gallery.js';
import { LiveView } from './live.js';
import { forgetKey, KEY_FORMAT, saveKey, savedKey } from './session.js';

/**
 * The page: sign-in with an API key, then the prompt form, the live view of the current job and
 * the gallery of the caller's jobs. Everything it shows comes from the API of this origin.
 */

const signInView = byId('sign-in-view');
const appView = byId('app-view');
const account = byId('account');
const banner = byId('banner');
const keyInput = byId('api-key', HTMLInputElement);
const keyError = byId('api-key-error');
const signInButton = byId('sign-in-button', HTMLButtonElement);

let api: Api | undefined;
const currentApi = (): Api => {
  if (!api) throw new Error('not signed in');
  return api;
};

function setBanner(text: string): void {
  banner.textContent = text;
  show(banner, text !== '');
}

/** A problem that is not one field's: a rate limit, a quota, the network, the API unavailable. */
function problem(err: ApiError): void {
  setBanner(err.describe());
}

const form = new PromptForm(currentApi, (job) => {
  setBanner('');
  live.follow(job);
  void gallery.load();
});
const live = new LiveView(currentApi, {
  useSeed: (seed) => form.useSeed(seed),
  ended: () => void gallery.load(),
  problem,
});
const gallery = new Gallery(currentApi, {
  view: (job) => {
    live.follow(job);
    byId('live-title').scrollIntoView({ block: 'nearest' });
  },
  runAgain: (job) => form.runAgain(job),
  problem,
});

function showKeyError(text: string): void {
  keyError.textContent = text;
  show(keyError, text !== '');
  if (text) keyInput.setAttribute('aria-invalid', 'true');
  else keyInput.removeAttribute('aria-invalid');
}

/** Back to the sign-in form, the key forgotten; `why` says what happened (a refused key). */
function signOut(why = ''): void {
  api = undefined;
  forgetKey();
  live.clear();
  gallery.clear();
  form.reset();
  setBanner('');
  show(appView, false);
  show(account, false);
  show(signInView, true);
  keyInput.value = '';
  showKeyError(why);
  keyInput.focus();
}

/** Any request answered 401: the key was revoked or is wrong. */
function unauthorized(err: ApiError): void {
  signOut(`The API refused the key: ${err.message} Sign in with a valid key.`);
}

/**
 * Uses `key` if the API takes it: shows the page, loads the form and the gallery. Returns
 * 'ok', 'refused' (401) or 'failed' (anything else: the key may still be good).
 */
async function signIn(key: string, remember: boolean | undefined): Promise<'ok' | 'refused' | 'failed'> {
  const candidate = new Api(key, () => undefined);
  let tenant: string;
  try {
    tenant = (await candidate.usage()).tenant;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showKeyError(err.status === 401 ? `The API refused this key: ${err.message}` : err.describe());
    return err.status === 401 ? 'refused' : 'failed';
  }
  api = new Api(key, unauthorized);
  // Kept as soon as the API takes it (undefined: it is kept already).
  if (remember !== undefined) saveKey(key, remember);
  showKeyError('');
  byId('tenant-name').textContent = tenant;
  show(signInView, false);
  show(account, true);
  show(appView, true);
  try {
    await form.load();
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) setBanner(`The form could not load the API's limits: ${err.describe()} Reload the page to try again.`);
  }
  await gallery.load();
  return 'ok';
}

byId('sign-in-form', HTMLFormElement).addEventListener('submit', (e) => {
  e.preventDefault();
  const key = keyInput.value.trim();
  if (!KEY_FORMAT.test(key)) {
    showKeyError('This is not a t2i API key: it looks like t2i_, 8 hexadecimal digits, _ and 64 more.');
    keyInput.focus();
    return;
  }
  signInButton.disabled = true;
  void signIn(key, byId('remember', HTMLInputElement).checked)
    .then((result) => (result === 'ok' ? byId('f-prompt') : keyInput).focus())
    .finally(() => (signInButton.disabled = false));
});

byId('sign-out').addEventListener('click', () => signOut());

// A key kept from before: use it if it still works.
const kept = savedKey();
if (kept) {
  void signIn(kept, undefined).then((result) => {
    if (result === 'refused') forgetKey();
    if (result !== 'ok') show(signInView, true);
  });
} else {
  show(signInView, true);
}
