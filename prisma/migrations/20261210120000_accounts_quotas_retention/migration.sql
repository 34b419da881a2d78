-- CreateTable
CREATE TABLE "tenants" (
    "id" UUID NOT NULL DEFAULT gen_random_uuid(),
    "name" TEXT NOT NULL,
    "max_in_flight" INTEGER,
    "daily_pixel_steps" BIGINT,
    "created_at" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "tenants_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "api_keys" (
    "id" UUID NOT NULL DEFAULT gen_random_uuid(),
    "tenant_id" UUID NOT NULL,
    "prefix" TEXT NOT NULL,
    "name" TEXT,
    "key_hash" TEXT NOT NULL,
    "created_at" TIMESTAMPTZ(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "last_used_at" TIMESTAMPTZ(3),
    "revoked_at" TIMESTAMPTZ(3),

    CONSTRAINT "api_keys_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE UNIQUE INDEX "tenants_name_key" ON "tenants"("name");

-- CreateIndex
CREATE UNIQUE INDEX "api_keys_prefix_key" ON "api_keys"("prefix");

-- CreateIndex
CREATE UNIQUE INDEX "api_keys_key_hash_key" ON "api_keys"("key_hash");

-- CreateIndex
CREATE INDEX "api_keys_tenant_id_idx" ON "api_keys"("tenant_id");

-- AddForeignKey
ALTER TABLE "api_keys" ADD CONSTRAINT "api_keys_tenant_id_fkey" FOREIGN KEY ("tenant_id") REFERENCES "tenants"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AlterTable (nullable first, so jobs created before accounts existed can be given an owner)
ALTER TABLE "generated_images" ADD COLUMN "tenant_id" UUID,
ADD COLUMN "pixel_steps" BIGINT,
ADD COLUMN "queue_priority" INTEGER NOT NULL DEFAULT 1,
ADD COLUMN "deleted_at" TIMESTAMPTZ(3);

-- Jobs from before accounts belong to a tenant named "legacy" (created only if there are any),
-- charged what they asked for. Give that tenant a key (`t2i keys create --tenant legacy`) to reach them.
INSERT INTO "tenants" ("name") SELECT 'legacy' WHERE EXISTS (SELECT 1 FROM "generated_images");
UPDATE "generated_images"
   SET "tenant_id" = (SELECT "id" FROM "tenants" WHERE "name" = 'legacy'),
       "pixel_steps" = "width"::BIGINT * "height" * "num_steps";
ALTER TABLE "generated_images" ALTER COLUMN "tenant_id" SET NOT NULL,
ALTER COLUMN "pixel_steps" SET NOT NULL;

-- DropIndex (the listing is per tenant now)
DROP INDEX "generated_images_created_at_id_idx";

-- CreateIndex
CREATE INDEX "generated_images_tenant_id_created_at_id_idx" ON "generated_images"("tenant_id", "created_at" DESC, "id" DESC);

-- CreateIndex
CREATE INDEX "generated_images_tenant_id_status_idx" ON "generated_images"("tenant_id", "status");

-- CreateIndex
CREATE INDEX "generated_images_deleted_at_finished_at_idx" ON "generated_images"("deleted_at", "finished_at");

-- AddForeignKey
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_tenant_id_fkey" FOREIGN KEY ("tenant_id") REFERENCES "tenants"("id") ON DELETE RESTRICT ON UPDATE CASCADE;

-- AddCheckConstraints (hand-written: Prisma cannot express CHECK constraints)
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_pixel_steps_check" CHECK ("pixel_steps" > 0);
ALTER TABLE "generated_images" ADD CONSTRAINT "generated_images_queue_priority_check" CHECK ("queue_priority" BETWEEN 1 AND 2097151);
