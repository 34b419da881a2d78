-- AlterTable: a job's parameters may be left for its model's first worker to fill in (a model
-- known but never served), and a job may carry input pictures and a strength.
ALTER TABLE "generated_images" ALTER COLUMN "num_steps" DROP NOT NULL,
ALTER COLUMN "guidance_scale" DROP NOT NULL,
ALTER COLUMN "width" DROP NOT NULL,
ALTER COLUMN "height" DROP NOT NULL,
ALTER COLUMN "scheduler" DROP NOT NULL,
ADD COLUMN "image_key" VARCHAR(255),
ADD COLUMN "mask_key" VARCHAR(255),
ADD COLUMN "strength" DOUBLE PRECISION;

-- AddCheckConstraints (hand-written: Prisma cannot express CHECK constraints)
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_strength_check" CHECK ("strength" BETWEEN 0 AND 1);
