-- Two things the usage counters (the tenant_usage_counters migration) must follow now that jobs
-- run on models.
--
-- A job of a model that was known but never served is admitted before its parameters are known:
-- it is charged as if 512x512 at 50 steps, and its first worker fills in the model's defaults and
-- corrects pixel_steps when it claims the job (ImagesRepo.startAttempt). The tenant's counter of
-- today's pixel-steps follows that correction when the job was charged to the counter's day.
--
-- Each model has its own queue, and a job's priority there is its rank among its tenant's jobs
-- in flight on that model (the tenant's k-th job waits behind every other tenant's (k-1)-th). So
-- that admission can take that rank in its one statement without counting the tenant's rows, the
-- jobs in flight are also counted per tenant and model, kept by the same triggers as the tenant's
-- counters. Rows without a model (made before models had names) are not counted here.

-- CreateTable
CREATE TABLE "tenant_model_usage" (
    "tenant_id" UUID NOT NULL,
    "model" TEXT NOT NULL,
    "in_flight" INTEGER NOT NULL DEFAULT 0,

    CONSTRAINT "tenant_model_usage_pkey" PRIMARY KEY ("tenant_id","model")
);

-- AddForeignKey
ALTER TABLE "tenant_model_usage" ADD CONSTRAINT "tenant_model_usage_tenant_id_fkey" FOREIGN KEY ("tenant_id") REFERENCES "tenants"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddCheckConstraints (hand-written: Prisma cannot express CHECK constraints)
ALTER TABLE "tenant_model_usage" ADD CONSTRAINT "tenant_model_usage_in_flight_check" CHECK ("in_flight" >= 0);

-- The counts as the rows say now.
INSERT INTO "tenant_model_usage" ("tenant_id", "model", "in_flight")
SELECT "tenant_id", "model", count(*) FROM "generated_images"
 WHERE "status" IN ('queued', 'running') AND "model" IS NOT NULL
 GROUP BY "tenant_id", "model";

-- Inserts, once per statement (the API admits many jobs in one INSERT).
CREATE OR REPLACE FUNCTION "t2i_tenant_usage_inserted"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  today DATE := (now() AT TIME ZONE 'UTC')::date;
BEGIN
  UPDATE "tenants" t SET
    "in_flight" = t."in_flight" + n."in_flight",
    "pixel_steps_today" = CASE WHEN t."usage_day" = today THEN t."pixel_steps_today" ELSE 0 END + n."pixel_steps",
    "usage_day" = today
  FROM (SELECT "tenant_id", count(*) FILTER (WHERE "status" IN ('queued', 'running'))::int AS "in_flight", sum("pixel_steps") AS "pixel_steps"
          FROM inserted GROUP BY "tenant_id") n
  WHERE t."id" = n."tenant_id";
  INSERT INTO "tenant_model_usage" AS u ("tenant_id", "model", "in_flight")
  SELECT "tenant_id", "model", count(*) FROM inserted
   WHERE "status" IN ('queued', 'running') AND "model" IS NOT NULL
   GROUP BY "tenant_id", "model"
  ON CONFLICT ("tenant_id", "model") DO UPDATE SET "in_flight" = u."in_flight" + EXCLUDED."in_flight";
  RETURN NULL;
END $$;

-- Updates and deletes, row by row: the tenant's counters as before (charge corrections
-- included), then the model's count where a job leaves or enters queued/running (or changes model
-- in flight). The tenant's row is always locked before the model's, as admission locks them (its
-- statement takes the tenant's row, then its trigger the model's): the other order could deadlock
-- a job ending against a submission of the same tenant.
CREATE OR REPLACE FUNCTION "t2i_tenant_usage"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_in_flight BOOLEAN := OLD."status" IN ('queued', 'running');
  is_in_flight BOOLEAN := TG_OP = 'UPDATE' AND NEW."status" IN ('queued', 'running');
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF was_in_flight THEN
      UPDATE "tenants" SET "in_flight" = "in_flight" - 1 WHERE "id" = OLD."tenant_id";
    END IF;
  ELSE
    IF NEW."pixel_steps" <> OLD."pixel_steps" AND NOT (NEW."status" = 'canceled' AND NEW."attempts" = 0) THEN
      UPDATE "tenants" SET "pixel_steps_today" = "pixel_steps_today" + (NEW."pixel_steps" - OLD."pixel_steps")
       WHERE "id" = NEW."tenant_id" AND "usage_day" = (OLD."created_at" AT TIME ZONE 'UTC')::date;
    END IF;
    IF was_in_flight AND NOT is_in_flight THEN
      UPDATE "tenants" SET
        "in_flight" = "in_flight" - 1,
        "pixel_steps_today" = "pixel_steps_today" - CASE
          WHEN NEW."status" = 'canceled' AND NEW."attempts" = 0 AND "usage_day" = (OLD."created_at" AT TIME ZONE 'UTC')::date
          THEN OLD."pixel_steps" ELSE 0 END
      WHERE "id" = NEW."tenant_id";
    ELSIF is_in_flight AND NOT was_in_flight THEN
      UPDATE "tenants" SET "in_flight" = "in_flight" + 1 WHERE "id" = NEW."tenant_id";
    END IF;
  END IF;
  IF was_in_flight AND OLD."model" IS NOT NULL AND NOT (is_in_flight AND NEW."model" IS NOT DISTINCT FROM OLD."model") THEN
    UPDATE "tenant_model_usage" SET "in_flight" = "in_flight" - 1 WHERE "tenant_id" = OLD."tenant_id" AND "model" = OLD."model";
  END IF;
  IF is_in_flight AND NEW."model" IS NOT NULL AND NOT (was_in_flight AND NEW."model" IS NOT DISTINCT FROM OLD."model") THEN
    INSERT INTO "tenant_model_usage" AS u ("tenant_id", "model", "in_flight") VALUES (NEW."tenant_id", NEW."model", 1)
    ON CONFLICT ("tenant_id", "model") DO UPDATE SET "in_flight" = u."in_flight" + 1;
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END $$;

DROP TRIGGER "generated_images_tenant_usage_update" ON "generated_images";
CREATE TRIGGER "generated_images_tenant_usage_update" AFTER UPDATE OF "status", "pixel_steps", "model" ON "generated_images"
  FOR EACH ROW EXECUTE FUNCTION "t2i_tenant_usage"();
