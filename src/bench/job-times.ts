import type pg from 'pg';
import { encodePng } from '../engine/png.js';

/** Per-job figures of the service bench, read back from the job rows. */

/** A 64x64 PNG made once; the fake engine hands out this buffer at once. */
export async function fixedPng(): Promise<Buffer> {
  const rgb = new Uint8Array(64 * 64 * 3);
  for (let i = 0; i < rgb.length; i += 3) rgb[i] = 200;
  return encodePng(rgb, 64, 64, {});
}

export interface JobTimes {
  /** finished_at - created_at - generation_ms */
  overhead: number[];
  /** started_at - created_at: commit, enqueue, pickup, claim */
  pickup: number[];
  /** finished_at - started_at - generation_ms: row read, storage put, succeed */
  work: number[];
  spanMs: number;
}

export async function rowTimes(db: pg.Client, ids: string[]): Promise<JobTimes> {
  const { rows } = await db.query<{ overhead: number; pickup: number; work: number; status: string }>(
    `SELECT status,
            extract(epoch FROM finished_at - created_at) * 1000 - coalesce(generation_ms, 0) AS overhead,
            extract(epoch FROM started_at - created_at) * 1000 AS pickup,
            extract(epoch FROM finished_at - started_at) * 1000 - coalesce(generation_ms, 0) AS work
       FROM generated_images WHERE id = ANY($1::uuid[])`,
    [ids],
  );
  const bad = rows.filter((r) => r.status !== 'succeeded');
  if (rows.length !== ids.length || bad.length > 0) {
    throw new Error(`expected ${ids.length} succeeded rows, got ${rows.length} rows, ${bad.length} not succeeded`);
  }
  const span = await db.query<{ span: number }>(
    `SELECT extract(epoch FROM max(finished_at) - min(created_at)) * 1000 AS span FROM generated_images WHERE id = ANY($1::uuid[])`,
    [ids],
  );
  return {
    overhead: rows.map((r) => Number(r.overhead)),
    pickup: rows.map((r) => Number(r.pickup)),
    work: rows.map((r) => Number(r.work)),
    spanMs: Number(span.rows[0]?.span ?? NaN),
  };
}
