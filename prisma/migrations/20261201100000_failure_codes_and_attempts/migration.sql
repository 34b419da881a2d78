-- AlterTable
ALTER TABLE "generated_images" ADD COLUMN "error_code" TEXT;

-- CreateTable
CREATE TABLE "job_attempts" (
    "image_id" UUID NOT NULL,
    "attempt" INTEGER NOT NULL,
    "worker_id" TEXT NOT NULL,
    "started_at" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "finished_at" TIMESTAMPTZ(3),
    "outcome" TEXT,
    "error_code" TEXT,

    CONSTRAINT "job_attempts_pkey" PRIMARY KEY ("image_id","attempt")
);

-- AddForeignKey
ALTER TABLE "job_attempts" ADD CONSTRAINT "job_attempts_image_id_fkey" FOREIGN KEY ("image_id") REFERENCES "generated_images"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- Messages written before this migration could carry internal details (hosts, paths): replace
-- them with the public message of the catch-all code.
UPDATE "generated_images" SET "error_code" = 'internal', "error" = 'The job failed because of an internal error.'
 WHERE "error" IS NOT NULL AND "status" = 'failed';
UPDATE "generated_images" SET "error" = NULL WHERE "error" IS NOT NULL AND "status" <> 'failed';
