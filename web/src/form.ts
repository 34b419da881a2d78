import { ApiError, type Api, type Job, type Models, type Schedulers } from './api.js';
import { byId, h, show } from './dom.js';
import { randomSeed, validateForm, type CreateBody, type FieldError, type FormValues } from './validate.js';

/**
 * The prompt form: its limits, defaults, models and schedulers come from the API (GET /models,
 * GET /schedulers); each field is checked as the API checks it, and whatever the API still
 * refuses is shown next to the field it names. Ctrl+Enter (or Cmd+Enter) submits.
 */

const FIELDS = ['prompt', 'negative_prompt', 'num_steps', 'guidance_scale', 'width', 'height', 'seed', 'scheduler', 'num_images'] as const;
type Field = (typeof FIELDS)[number];

const input = (name: Field) => byId<HTMLInputElement | HTMLTextAreaElement | HTMLSelectElement>(`f-${name}`);

export class PromptForm {
  private readonly form = byId('generate-form', HTMLFormElement);
  private readonly model = byId('f-model', HTMLSelectElement);
  private readonly scheduler = byId('f-scheduler', HTMLSelectElement);
  private readonly button = byId('generate-button', HTMLButtonElement);
  private readonly formError = byId('form-error');
  private readonly status = byId('form-status');
  private models: Models | undefined;
  private schedulers: Schedulers | undefined;
  private busy = false;

  constructor(
    private readonly api: () => Api,
    /** A job was created: follow it. */
    private readonly onCreated: (job: Job) => void,
  ) {
    this.form.addEventListener('submit', (e) => {
      e.preventDefault();
      void this.submit();
    });
    this.form.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.form.requestSubmit();
      }
    });
    byId('dice').addEventListener('click', () => {
      input('seed').value = String(randomSeed());
      this.checkField('seed');
    });
    this.model.addEventListener('change', () => this.applyModel(true));
    // Fields are checked on submit, then as a refused one is corrected. Not on leaving a field:
    // a message appearing then moves the button under a pointer that is about to click it.
    for (const name of FIELDS) {
      const el = input(name);
      el.addEventListener('input', () => {
        if (el.getAttribute('aria-invalid') === 'true') this.checkField(name);
      });
    }
    input('prompt').addEventListener('input', () => this.countPrompt());
  }

  /** Reads limits, models and schedulers; fills the fields with the model's defaults. */
  async load(): Promise<void> {
    const [models, schedulers] = await Promise.all([this.api().models(), this.api().schedulers()]);
    this.models = models;
    this.schedulers = schedulers;
    const l = models.limits;
    const numberLimits: Array<[Field, number, number, number | 'any', string]> = [
      ['width', l.min_side, l.max_side, l.side_multiple_of, `${l.min_side}–${l.max_side} pixels, a multiple of ${l.side_multiple_of}.`],
      ['height', l.min_side, l.max_side, l.side_multiple_of, `${l.min_side}–${l.max_side} pixels, a multiple of ${l.side_multiple_of}.`],
      ['num_steps', l.min_steps, l.max_steps, 1, `${l.min_steps}–${l.max_steps} denoising steps.`],
      ['guidance_scale', 0, l.max_guidance_scale, 'any', `0–${l.max_guidance_scale}: how closely to follow the prompt.`],
      ['num_images', 1, l.max_images, 1, `1–${l.max_images}; image k gets seed + k.`],
      ['seed', 0, 4294967295, 1, ''],
    ];
    for (const [name, min, max, step, hint] of numberLimits) {
      const el = input(name);
      el.setAttribute('min', String(min));
      el.setAttribute('max', String(max));
      el.setAttribute('step', String(step));
      if (hint) byId(`f-${name}-hint`).textContent = hint;
    }
    this.model.replaceChildren(
      ...(models.models.length > 0
        ? models.models.map((m) => h('option', { value: m.id }, m.variant ? `${m.id} (${m.variant})` : m.id))
        : [h('option', { value: '' }, 'No worker is serving a model yet')]),
    );
    // The server's default model first; else the first listed (the one most workers serve).
    const preferred = models.models.find((m) => m.default) ?? models.models[0];
    if (preferred) this.model.value = preferred.id;
    this.applyModel(true);
    input('num_images').value = String(models.request_defaults?.num_images ?? 1);
    this.countPrompt();
  }

  /** The chosen model's schedulers and, when asked, its defaults. */
  private applyModel(withDefaults: boolean): void {
    if (!this.models || !this.schedulers) return;
    const m = this.models.models.find((x) => x.id === this.model.value);
    // A model never served has no defaults yet: the fields keep what they hold.
    const defaults = m ? m.model_defaults : this.models.request_defaults;
    // Each model has its own queue and workers: a job runs on a worker of the model chosen here.
    const served =
      m?.status === 'no_worker'
        ? 'No worker serves it right now: its jobs wait in its queue until one starts.'
        : m
          ? `Served by ${m.workers} worker${m.workers === 1 ? '' : 's'}${m.providers.length ? ` (${m.providers.join(', ')})` : ''}.`
          : 'Jobs wait in the queue until a worker starts.';
    const several = this.models.models.length > 1 ? ' This server runs several models: the job runs on this one, with its defaults.' : '';
    byId('f-model-hint').textContent = m ? `${served}${several || ' Choosing it sets its defaults.'}` : served;
    const names = new Set(m?.schedulers.length ? m.schedulers : this.schedulers.schedulers.map((s) => s.name));
    const keep = this.scheduler.value;
    this.scheduler.replaceChildren(...this.schedulers.schedulers.filter((s) => names.has(s.name)).map((s) => h('option', { value: s.name }, s.name)));
    this.scheduler.value = (withDefaults || !names.has(keep)) && defaults ? defaults.scheduler : keep;
    this.scheduler.onchange = () => this.describeScheduler();
    this.describeScheduler();
    if (withDefaults && defaults) {
      input('num_steps').value = String(defaults.num_steps);
      input('guidance_scale').value = String(defaults.guidance_scale);
      input('width').value = String(defaults.width);
      input('height').value = String(defaults.height);
    }
  }

  private describeScheduler(): void {
    byId('f-scheduler-hint').textContent = this.schedulers?.schedulers.find((s) => s.name === this.scheduler.value)?.description ?? '';
  }

  private countPrompt(): void {
    const n = [...input('prompt').value].length;
    const max = this.models?.limits.max_prompt_chars;
    byId('prompt-count').textContent = max ? `${n} of ${max} characters.` : '';
  }

  private values(): FormValues {
    return Object.fromEntries(FIELDS.map((f) => [f, input(f).value])) as unknown as FormValues;
  }

  private check(): { body?: CreateBody; errors: FieldError[] } {
    if (!this.models || !this.schedulers) return { errors: [{ field: '(body)', rule: 'loading', message: 'The form is still loading its limits.' }] };
    return validateForm(
      this.values(),
      this.models.limits,
      this.schedulers.schedulers.map((s) => s.name),
    );
  }

  private checkField(name: Field): void {
    this.showErrors(
      name,
      this.check().errors.filter((e) => e.field === name),
    );
  }

  /** Shows one field's errors next to it (or clears them), linked to it for screen readers. */
  private showErrors(name: Field, errors: FieldError[]): void {
    const el = input(name);
    const box = byId(`f-${name}-error`);
    // The API's messages name no field ("must be a multiple of 8"): the label beside them does.
    box.textContent = errors.map((e) => `${labelOf(name)} ${e.message}.`).join(' ');
    show(box, errors.length > 0);
    if (errors.length > 0) el.setAttribute('aria-invalid', 'true');
    else el.removeAttribute('aria-invalid');
  }

  /** Errors from a check or from the API: each next to its field, the rest above the button; focus on the first. */
  private showAll(errors: FieldError[]): void {
    const byField = new Map<Field, FieldError[]>();
    const other: FieldError[] = [];
    for (const e of errors) {
      if ((FIELDS as readonly string[]).includes(e.field)) byField.set(e.field as Field, [...(byField.get(e.field as Field) ?? []), e]);
      else other.push(e);
    }
    for (const f of FIELDS) this.showErrors(f, byField.get(f) ?? []);
    this.setFormError(other.map((e) => (e.field === '(body)' ? `${capitalise(e.message)}.` : `${e.field} ${e.message}.`)).join(' '));
    const first = FIELDS.find((f) => byField.has(f));
    if (first) input(first).focus();
  }

  setFormError(text: string): void {
    this.formError.textContent = text;
    show(this.formError, text !== '');
  }

  private async submit(): Promise<void> {
    if (this.busy) return;
    const { body, errors } = this.check();
    this.showAll(errors);
    if (!body) return;
    this.busy = true;
    this.button.disabled = true;
    this.status.textContent = 'Sending…';
    try {
      // The chosen model, so the job goes to its queue (none listed: the server's default).
      const job = await this.api().submit(this.model.value ? { ...body, model: this.model.value } : body);
      this.status.textContent = 'Started.';
      this.onCreated(job);
    } catch (err) {
      this.status.textContent = '';
      if (!(err instanceof ApiError)) throw err;
      // 400: each rule the API refused, next to its field; 429, 503 and the rest: above the button.
      if (err.status === 400 && err.errors.length > 0) this.showAll(err.errors);
      else if (err.status !== 401) this.setFormError(err.describe());
    } finally {
      this.busy = false;
      this.button.disabled = false;
    }
  }

  /** Fills the form with a job's parameters ("run again"). */
  fill(job: Job): void {
    input('prompt').value = job.prompt;
    input('negative_prompt').value = job.negative_prompt ?? '';
    // Its model, when the server still lists it (its defaults are not applied: the job's values follow).
    if (job.model !== null && [...this.model.options].some((o) => o.value === job.model)) {
      this.model.value = job.model;
      this.applyModel(false);
    }
    if (job.scheduler !== null) {
      const scheduler = job.scheduler;
      if (![...this.scheduler.options].some((o) => o.value === scheduler)) this.scheduler.append(h('option', { value: scheduler }, scheduler));
      this.scheduler.value = scheduler;
      this.describeScheduler();
    }
    // A value the job left to its model's first worker stays as the form has it.
    for (const f of ['num_steps', 'guidance_scale', 'width', 'height', 'seed', 'num_images'] as const) {
      const v = job[f];
      if (v !== null) input(f).value = String(v);
    }
    this.countPrompt();
  }

  /** "Run again": the job's parameters, submitted. */
  runAgain(job: Job): void {
    this.fill(job);
    this.form.requestSubmit();
  }

  useSeed(seed: number): void {
    const el = input('seed');
    el.value = String(seed);
    this.showErrors('seed', []);
    el.focus();
    this.status.textContent = `Seed set to ${seed}.`;
  }

  /** Back to an empty form (sign-out). */
  reset(): void {
    this.form.reset();
    for (const f of FIELDS) this.showErrors(f, []);
    this.setFormError('');
    this.status.textContent = '';
  }
}

function labelOf(name: Field): string {
  return (document.querySelector(`label[for="f-${name}"]`)?.firstChild?.textContent ?? name).trim();
}

function capitalise(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
