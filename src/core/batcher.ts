/**
 * Turns many concurrent calls into few batched ones, without a timer: a call starts a batch at
 * once when none is running; calls that arrive while one runs wait for it and then go together,
 * up to `max` per batch. A lone request is never delayed; under load each round trip serves many.
 * (The same idea as TCP's Nagle algorithm, or a database's group commit.)
 */
export class Batcher<I, O> {
  private pending: Array<{ item: I; resolve: (o: O) => void; reject: (e: unknown) => void }> = [];
  private running = false;

  constructor(
    /** Gets the items of one batch, returns one result per item in the same order, or throws for all of them. */
    private readonly run: (items: I[]) => Promise<O[]>,
    private readonly max: number,
  ) {}

  submit(item: I): Promise<O> {
    return new Promise<O>((resolve, reject) => {
      this.pending.push({ item, resolve, reject });
      if (!this.running) void this.drain();
    });
  }

  private async drain(): Promise<void> {
    this.running = true;
    while (this.pending.length > 0) {
      const batch = this.pending.splice(0, this.max);
      try {
        const results = await this.run(batch.map((b) => b.item));
        if (results.length !== batch.length) throw new Error(`batch of ${batch.length} gave ${results.length} results`);
        batch.forEach((b, i) => b.resolve(results[i]!));
      } catch (err) {
        for (const b of batch) b.reject(err);
      }
    }
    this.running = false;
  }
}
