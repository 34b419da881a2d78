-- Per-tenant usage counters, so a submission is admitted (quotas checked, the job inserted, its
-- priority taken) in one statement that locks the tenant's row for that statement only, instead
-- of counting the tenant's rows under a lock held for a whole transaction: submissions of one
-- tenant no longer wait on each other's round trips, and the cost no longer grows with its backlog.

-- AlterTable
ALTER TABLE "tenants" ADD COLUMN "in_flight" INTEGER NOT NULL DEFAULT 0,
ADD COLUMN "usage_day" DATE NOT NULL DEFAULT CURRENT_DATE,
ADD COLUMN "pixel_steps_today" BIGINT NOT NULL DEFAULT 0;

-- The counters as the rows say now (UTC days, as the API counts them).
UPDATE "tenants" t SET
  "usage_day" = (now() AT TIME ZONE 'UTC')::date,
  "in_flight" = (SELECT count(*) FROM "generated_images" g WHERE g."tenant_id" = t."id" AND g."status" IN ('queued', 'running')),
  "pixel_steps_today" = (SELECT COALESCE(sum(g."pixel_steps"), 0) FROM "generated_images" g
                          WHERE g."tenant_id" = t."id" AND (g."created_at" AT TIME ZONE 'UTC')::date = (now() AT TIME ZONE 'UTC')::date
                            AND NOT (g."status" = 'canceled' AND g."attempts" = 0));

-- AddCheckConstraints (hand-written: Prisma cannot express CHECK constraints)
ALTER TABLE "tenants" ADD CONSTRAINT "tenants_in_flight_check" CHECK ("in_flight" >= 0);

-- The counters follow the rows, whatever writes them: a job inserted queued takes a slot and is
-- charged its pixel-steps today (the API's admission statement checks the limits against these
-- counters, under the tenant row's lock, in the same statement as the insert); a job that leaves
-- queued/running gives its slot back; one canceled before any attempt began gives back what it
-- was charged today. Days are UTC days of the database's clock.
-- Inserts are counted once per statement and tenant (the API admits many jobs in one INSERT).
CREATE FUNCTION "t2i_tenant_usage_inserted"() RETURNS trigger LANGUAGE plpgsql AS $$
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
  RETURN NULL;
END $$;

CREATE FUNCTION "t2i_tenant_usage"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD."status" IN ('queued', 'running') THEN
      UPDATE "tenants" SET "in_flight" = "in_flight" - 1 WHERE "id" = OLD."tenant_id";
    END IF;
    RETURN OLD;
  END IF;
  IF OLD."status" IN ('queued', 'running') AND NEW."status" NOT IN ('queued', 'running') THEN
    UPDATE "tenants" SET
      "in_flight" = "in_flight" - 1,
      "pixel_steps_today" = "pixel_steps_today" - CASE
        WHEN NEW."status" = 'canceled' AND NEW."attempts" = 0 AND "usage_day" = (OLD."created_at" AT TIME ZONE 'UTC')::date
        THEN OLD."pixel_steps" ELSE 0 END
    WHERE "id" = NEW."tenant_id";
  ELSIF OLD."status" NOT IN ('queued', 'running') AND NEW."status" IN ('queued', 'running') THEN
    UPDATE "tenants" SET "in_flight" = "in_flight" + 1 WHERE "id" = NEW."tenant_id";
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER "generated_images_tenant_usage_insert" AFTER INSERT ON "generated_images"
  REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION "t2i_tenant_usage_inserted"();
CREATE TRIGGER "generated_images_tenant_usage_update" AFTER UPDATE OF "status" ON "generated_images"
  FOR EACH ROW EXECUTE FUNCTION "t2i_tenant_usage"();
CREATE TRIGGER "generated_images_tenant_usage_delete" AFTER DELETE ON "generated_images"
  FOR EACH ROW EXECUTE FUNCTION "t2i_tenant_usage"();
