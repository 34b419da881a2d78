import { ApiError, type Api, type Job } from './api.js';
import { BlobUrls, byId, h, show, when } from './dom.js';

/**
 * The caller's jobs, newest first, a page at a time (GET /generated-images with its cursor):
 * status, parameters, a thumbnail for the finished ones, "view" and "run again".
 */

const PAGE_SIZE = 8;
/** Thumbnails fetched at once: enough to fill a page quickly without queueing a dozen requests. */
const PARALLEL_THUMBNAILS = 4;

const STATUS_TEXT: Record<Job['status'], string> = { queued: 'Queued', running: 'Running', succeeded: 'Succeeded', failed: 'Failed', canceled: 'Canceled' };

export class Gallery {
  private readonly list = byId('gallery-list');
  private readonly message = byId('gallery-message');
  private readonly newer = byId('gallery-newer', HTMLButtonElement);
  private readonly older = byId('gallery-older', HTMLButtonElement);
  private readonly pageLabel = byId('gallery-page');
  private readonly urls = new BlobUrls();
  /** Cursors of the pages seen so far: [null] is the newest page. */
  private cursors: Array<string | null> = [null];
  private page = 0;
  private nextCursor: string | null = null;
  /** Bumped by every load, so a slow answer for a page left behind is dropped. */
  private generation = 0;

  constructor(
    private readonly api: () => Api,
    private readonly actions: { view(job: Job): void; runAgain(job: Job): void; problem(err: ApiError): void },
  ) {
    byId('gallery-refresh').addEventListener('click', () => void this.load(this.page));
    this.newer.addEventListener('click', () => void this.load(this.page - 1));
    this.older.addEventListener('click', () => {
      if (this.nextCursor) this.cursors[this.page + 1] = this.nextCursor;
      void this.load(this.page + 1);
    });
  }

  /** Shows page `page` (0: the newest). */
  async load(page = 0): Promise<void> {
    const generation = ++this.generation;
    this.message.textContent = 'Loading…';
    let answer: { items: Job[]; next_cursor: string | null };
    try {
      answer = await this.api().list(PAGE_SIZE, this.cursors[page] ?? null);
    } catch (err) {
      if (generation !== this.generation) return;
      this.message.textContent = '';
      if (err instanceof ApiError && err.status !== 401) this.actions.problem(err);
      return;
    }
    if (generation !== this.generation) return;
    this.page = page;
    this.nextCursor = answer.next_cursor;
    this.urls.revokeAll();
    this.list.replaceChildren(...answer.items.map((job) => this.card(job)));
    this.message.textContent = answer.items.length === 0 && page === 0 ? 'No images yet.' : '';
    this.pageLabel.textContent = `Page ${page + 1}`;
    this.newer.disabled = page === 0;
    this.older.disabled = answer.next_cursor === null;
    void this.thumbnails(answer.items, generation);
  }

  private card(job: Job): HTMLLIElement {
    const promptId = `g-prompt-${job.id}`;
    const view = h('button', { type: 'button', class: 'secondary', 'aria-describedby': promptId }, 'View');
    view.addEventListener('click', () => this.actions.view(job));
    const again = h('button', { type: 'button', 'aria-describedby': promptId }, 'Run again');
    again.addEventListener('click', () => this.actions.runAgain(job));
    const params = [
      `${job.width}×${job.height}`,
      `${job.num_steps} steps`,
      `guidance ${job.guidance_scale}`,
      job.scheduler,
      `seed ${job.seed}`,
      ...(job.num_images > 1 ? [`${job.num_images} images`] : []),
    ];
    return h(
      'li',
      { class: 'card', 'data-job-id': job.id, 'data-status': job.status },
      h(
        'div',
        { class: 'thumb', id: `g-thumb-${job.id}` },
        job.status === 'succeeded' ? null : h('span', { class: 'thumb-placeholder' }, STATUS_TEXT[job.status]),
      ),
      h(
        'div',
        { class: 'card-body' },
        h('p', { class: `status status-${job.status}` }, STATUS_TEXT[job.status], job.status === 'running' ? ` · ${job.progress}%` : ''),
        h('p', { class: 'card-prompt', id: promptId }, job.prompt),
        job.negative_prompt ? h('p', { class: 'hint' }, `Not: ${job.negative_prompt}`) : null,
        h('p', { class: 'params' }, params.join(' · ')),
        job.error ? h('p', { class: 'card-error' }, job.error.message) : null,
        h('p', { class: 'hint' }, h('time', { datetime: job.created_at }, when(job.created_at))),
        h('div', { class: 'actions' }, view, again),
      ),
    );
  }

  private async thumbnails(items: Job[], generation: number): Promise<void> {
    const queue = items.filter((j) => j.status === 'succeeded');
    const next = async (): Promise<void> => {
      const job = queue.shift();
      if (!job || generation !== this.generation) return;
      try {
        const url = this.urls.make(await this.api().image(job.id, 0, true));
        // Not loading=lazy: the bytes are in memory already (a blob URL), and a lazy image below
        // the fold may stay blank in a screenshot or a printout.
        if (generation === this.generation) document.getElementById(`g-thumb-${job.id}`)?.replaceChildren(h('img', { src: url, alt: job.prompt }));
      } catch {
        // A missing thumbnail leaves the card as it is; the job's facts are there.
      }
      await next();
    };
    await Promise.all(Array.from({ length: PARALLEL_THUMBNAILS }, next));
  }

  clear(): void {
    this.generation++;
    this.urls.revokeAll();
    this.list.replaceChildren();
    this.cursors = [null];
    this.page = 0;
    this.message.textContent = '';
    show(this.list, true);
  }
}
