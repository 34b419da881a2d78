-- CreateEnum
CREATE TYPE "job_status" AS ENUM ('queued', 'running', 'succeeded', 'failed', 'canceled');

-- CreateTable
CREATE TABLE "generated_images" (
    "id" UUID NOT NULL DEFAULT gen_random_uuid(),
    "status" "job_status" NOT NULL DEFAULT 'queued',
    "prompt" TEXT NOT NULL,
    "negative_prompt" TEXT,
    "num_steps" INTEGER NOT NULL,
    "guidance_scale" DOUBLE PRECISION NOT NULL,
    "seed" BIGINT NOT NULL,
    "width" INTEGER NOT NULL,
    "height" INTEGER NOT NULL,
    "scheduler" TEXT NOT NULL,
    "progress" INTEGER NOT NULL DEFAULT 0,
    "file_name" VARCHAR(255),
    "error" TEXT,
    "attempts" INTEGER NOT NULL DEFAULT 0,
    "worker_id" TEXT,
    "model" TEXT,
    "created_at" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updated_at" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "started_at" TIMESTAMPTZ(3),
    "finished_at" TIMESTAMPTZ(3),
    "cancel_requested_at" TIMESTAMPTZ(3),
    "generation_ms" INTEGER,

    CONSTRAINT "generated_images_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE INDEX "generated_images_created_at_id_idx" ON "generated_images"("created_at" DESC, "id" DESC);

-- CreateIndex
CREATE INDEX "generated_images_status_updated_at_idx" ON "generated_images"("status", "updated_at");

-- AddCheckConstraints (hand-written: Prisma cannot express CHECK constraints, and its diff ignores them)
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_progress_check" CHECK ("progress" BETWEEN 0 AND 100);
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_num_steps_check" CHECK ("num_steps" >= 1);
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_seed_check" CHECK ("seed" BETWEEN 0 AND 4294967295);
