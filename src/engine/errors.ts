/**
 * Errors of the engine that mean something to the service. They cross the thread boundary by
 * name (protocol.ts serializes name and message), so the host can tell them apart.
 */

/** The request needed more memory than the process could get (onnxruntime, CUDA or V8). */
export class OutOfMemoryError extends Error {
  override name = 'OutOfMemoryError';
}

/**
 * How allocation failures read: onnxruntime's CPU arena and allocator, CUDA and cuDNN, and V8's
 * ArrayBuffer allocation. A retry on the same worker would fail the same way.
 */
const ALLOCATION_FAILURE =
  /Failed to allocate memory|bad_alloc|out of memory|CUDNN_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|CUBLAS_STATUS_ALLOC_FAILED|Available memory of \d+ is smaller than requested bytes|Array buffer allocation failed|Reached heap limit/i;

export function isAllocationFailure(err: unknown): boolean {
  for (let e = err as { message?: unknown; cause?: unknown } | undefined, depth = 0; e && depth < 5; e = e.cause as typeof e, depth++) {
    if (e instanceof OutOfMemoryError) return true;
    if (typeof e.message === 'string' && ALLOCATION_FAILURE.test(e.message)) return true;
  }
  return false;
}
