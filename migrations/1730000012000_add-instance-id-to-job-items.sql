-- Denormalise the store onto its items so a claim can pick per store without joining jobs.
-- Runs outside a transaction: the backfill commits every batch (a table of millions of rows is
-- never locked for long) and the indexes are built CONCURRENTLY. Every statement can run again,
-- so a migration interrupted half-way is finished by the next `migrate up`.
-- transaction: off
-- up --
DO $$ BEGIN RAISE NOTICE 'Adding instance_id column to job_items...'; END $$;

ALTER TABLE job_items ADD COLUMN IF NOT EXISTS instance_id text;

-- Old clients keep inserting without instance_id during and after the deploy: fill it in.
CREATE OR REPLACE FUNCTION job_items_fill_instance_id() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    SELECT j.instance_id INTO NEW.instance_id FROM jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS job_items_fill_instance_id ON job_items;

CREATE TRIGGER job_items_fill_instance_id
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.instance_id IS NULL)
    EXECUTE FUNCTION job_items_fill_instance_id();

DO $$
DECLARE
    batch_size constant bigint := 10000;
    first_id bigint;
    low bigint;
    high bigint;
    total bigint;
    reported integer := 0;
    percent integer;
BEGIN
    SELECT min(id), max(id), count(*) INTO first_id, high, total
    FROM job_items WHERE instance_id IS NULL;
    IF total = 0 THEN
        RETURN;
    END IF;
    RAISE NOTICE '  backfilling instance_id for % row(s) in batches of %', total, batch_size;
    low := first_id;
    WHILE low <= high LOOP
        UPDATE job_items i SET instance_id = j.instance_id
        FROM jobs j
        WHERE j.id = i.job_id AND i.id >= low AND i.id < low + batch_size
          AND i.instance_id IS NULL;
        low := low + batch_size;
        -- Each batch commits: row locks are held for one batch, never for the whole table.
        COMMIT;
        percent := least(100, (100 * (low - first_id) / (high - first_id + 1))::integer);
        IF percent >= reported + 10 OR low > high THEN
            reported := percent;
            RAISE NOTICE '  backfilled % percent of % row(s)', percent, total;
        END IF;
    END LOOP;
END;
$$;

-- NOT NULL through a validated CHECK: the validation scans without blocking writes, and
-- SET NOT NULL then trusts the constraint instead of scanning again under an exclusive lock.
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_instance_id_not_null;
ALTER TABLE job_items ADD CONSTRAINT job_items_instance_id_not_null
    CHECK (instance_id IS NOT NULL) NOT VALID;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_instance_id_not_null;
ALTER TABLE job_items ALTER COLUMN instance_id SET NOT NULL;
ALTER TABLE job_items DROP CONSTRAINT job_items_instance_id_not_null;

-- An interrupted CONCURRENTLY build leaves an invalid index behind: drop and build again.
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_instance_status_id;
CREATE INDEX CONCURRENTLY idx_job_items_instance_status_id
    ON job_items (instance_id, status, id);
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_status_id;
CREATE INDEX CONCURRENTLY idx_job_items_status_id ON job_items (status, id);

DO $$ BEGIN RAISE NOTICE '✓ Migration completed: instance_id added to job_items'; END $$;

-- down --
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_status_id;
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_instance_status_id;
DROP TRIGGER IF EXISTS job_items_fill_instance_id ON job_items;
DROP FUNCTION IF EXISTS job_items_fill_instance_id();
ALTER TABLE job_items DROP COLUMN IF EXISTS instance_id;
