import { ApiError, type Api, type Job } from './api.js';
import { BlobUrls, byId, duration, h, show } from './dom.js';
import { readEvents, type StreamEvent } from './sse.js';

/**
 * One job, live: its place in the queue, then a progress bar with the step and the time left,
 * the previews as they arrive, and at the end its images with a download link and "use this
 * seed". Events come from GET /generated-images/{id}/events; a dropped stream is resumed with
 * the last event id (the API replays what was missed, nothing twice).
 */

const RECONNECTS = 5;

export class LiveView {
  private readonly empty = byId('live-empty');
  private readonly box = byId('live-job');
  private readonly phase = byId('live-phase');
  private readonly progress = byId('live-progress', HTMLProgressElement);
  private readonly percent = byId('live-percent');
  private readonly step = byId('live-step');
  private readonly previewFigure = byId('live-preview-figure');
  private readonly preview = byId('live-preview', HTMLImageElement);
  private readonly previewCaption = byId('live-preview-caption');
  private readonly strip = byId('live-previews');
  private readonly results = byId('live-results');
  private readonly error = byId('live-error');
  private readonly cancelButton = byId('live-cancel', HTMLButtonElement);
  private readonly urls = new BlobUrls();
  private controller: AbortController | undefined;
  private job: Job | undefined;

  constructor(
    private readonly api: () => Api,
    private readonly actions: {
      useSeed(seed: number): void;
      /** The job ended (the gallery shows it). */
      ended(job: Job): void;
      /** A failure that is not the job's (429, network): shown by the page. */
      problem(err: ApiError): void;
    },
  ) {
    this.cancelButton.addEventListener('click', () => void this.cancel());
  }

  /** Follows a job from its first event (the stream replays what already happened). */
  follow(job: Job): void {
    this.stop();
    this.job = job;
    show(this.empty, false);
    show(this.box, true);
    byId('live-prompt').textContent = job.prompt;
    this.setProgress(job.progress);
    this.step.textContent = '';
    this.phase.textContent = phaseText(job.status);
    show(this.previewFigure, false);
    this.strip.replaceChildren();
    this.results.replaceChildren();
    this.setError('');
    this.cancelButton.disabled = false;
    show(this.cancelButton, job.status === 'queued' || job.status === 'running');
    const controller = new AbortController();
    this.controller = controller;
    void this.stream(job.id, controller.signal);
  }

  /** Stops following (another job, sign-out) and releases the images. */
  stop(): void {
    this.controller?.abort();
    this.controller = undefined;
    this.urls.revokeAll();
  }

  /** Back to nothing shown. */
  clear(): void {
    this.stop();
    this.job = undefined;
    show(this.box, false);
    show(this.empty, true);
  }

  private async stream(id: string, signal: AbortSignal): Promise<void> {
    let lastId: string | null = null;
    for (let attempt = 0; attempt <= RECONNECTS && !signal.aborted; attempt++) {
      try {
        const res = await this.api().events(id, lastId, signal);
        for await (const e of readEvents(res)) {
          if (signal.aborted) return;
          if (e.id) lastId = e.id;
          attempt = 0;
          if (await this.onEvent(e, signal)) return;
        }
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && err.status !== 0) {
          // 401 signs the page out; others (429, 404) are said where the job is.
          if (err.status !== 401) this.setError(err.describe());
          return;
        }
      }
      // The stream ended before the job did (a restart, a proxy, the network): resume after a pause.
      await new Promise((r) => setTimeout(r, 500 * 2 ** attempt));
    }
    if (!signal.aborted) this.setError('Lost the connection to the job’s progress. Refresh the gallery to see how it ended.');
  }

  /** Shows one event; true when it was the last. */
  private async onEvent(e: StreamEvent, signal: AbortSignal): Promise<boolean> {
    const d = e.data;
    switch (e.event) {
      case 'status':
        this.phase.textContent = d.status === 'running' ? 'Running' : d.error ? `Queued again after a failed attempt: ${errorText(d.error)}` : 'Queued';
        return false;
      case 'queue': {
        const ahead = Number(d.jobs_ahead);
        this.phase.textContent = ahead === 0 ? 'Queued: yours is next' : `Queued: ${ahead} job${ahead === 1 ? '' : 's'} ahead of yours`;
        return false;
      }
      case 'progress':
        this.setProgress(Number(d.percent));
        this.step.textContent = `Step ${Number(d.step)} of ${Number(d.total)} · ${Number(d.percent) >= 100 ? 'finishing' : `${duration(Number(d.eta_ms))} left`}`;
        if (this.phase.textContent !== 'Running') this.phase.textContent = 'Running';
        return false;
      case 'preview':
        this.showPreview(String(d.data), String(d.content_type), Number(d.step), Number(d.total));
        return false;
      case 'done':
        await this.showResult(d as unknown as { images: Array<{ index: number; seed: number }> }, signal);
        return true;
      case 'failed':
        this.end('Failed');
        this.setError(`The job failed: ${errorText(d.error)}`);
        return true;
      case 'canceled':
        this.end('Canceled');
        return true;
      default:
        return false;
    }
  }

  private setProgress(percent: number): void {
    this.progress.value = percent;
    this.percent.textContent = `${percent}%`;
  }

  private showPreview(base64: string, type: string, step: number, total: number): void {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const url = this.urls.make(new Blob([bytes], { type }));
    const alt = `Preview at step ${step} of ${total}`;
    this.preview.src = url;
    this.preview.alt = alt;
    this.previewCaption.textContent = alt;
    show(this.previewFigure, true);
    this.strip.append(h('li', {}, h('img', { src: url, alt, width: 48, height: 48 })));
  }

  private end(phase: string): void {
    this.phase.textContent = phase;
    this.step.textContent = '';
    show(this.cancelButton, false);
    const job = this.job;
    if (job) this.actions.ended(job);
  }

  private async showResult(done: { images: Array<{ index: number; seed: number }> }, signal: AbortSignal): Promise<void> {
    const job = this.job!;
    this.setProgress(100);
    this.step.textContent = '';
    show(this.previewFigure, false);
    const figures = await Promise.all(
      done.images.map(async ({ index, seed }) => {
        const blob = await this.api().image(job.id, index);
        const url = this.urls.make(blob);
        const useSeed = h('button', { type: 'button', class: 'secondary' }, 'Use this seed');
        useSeed.addEventListener('click', () => this.actions.useSeed(seed));
        return h(
          'figure',
          { class: 'result' },
          h('img', { src: url, alt: `${job.prompt} (seed ${seed})`, width: job.width, height: job.height }),
          h(
            'figcaption',
            {},
            h('span', {}, `Seed ${seed}`),
            h('a', { href: url, download: `t2i-${job.id.slice(0, 8)}-${seed}.png`, class: 'button' }, 'Download'),
            useSeed,
          ),
        );
      }),
    ).catch((err: unknown) => {
      if (err instanceof ApiError) this.setError(`The image could not be loaded: ${err.describe()}`);
      return [];
    });
    if (signal.aborted) return;
    this.results.replaceChildren(...figures);
    this.end('Done');
  }

  private async cancel(): Promise<void> {
    const job = this.job;
    if (!job) return;
    this.cancelButton.disabled = true;
    this.phase.textContent = 'Canceling…';
    try {
      // The stream then ends with `canceled`: at once for a queued job, at the next step for a running one.
      await this.api().cancel(job.id);
    } catch (err) {
      this.cancelButton.disabled = false;
      if (err instanceof ApiError && err.status === 409) this.setError('It finished before it could be canceled.');
      else if (err instanceof ApiError && err.status !== 401) this.actions.problem(err);
    }
  }

  private setError(text: string): void {
    this.error.textContent = text;
    show(this.error, text !== '');
  }
}

function phaseText(status: Job['status']): string {
  return { queued: 'Queued', running: 'Running', succeeded: 'Done', failed: 'Failed', canceled: 'Canceled' }[status];
}

function errorText(e: unknown): string {
  const err = e as { message?: string; code?: string } | undefined;
  return err?.message ? `${err.message}${err.code ? ` (${err.code})` : ''}` : 'no reason was given';
}
