-- Store policy: job and item priorities, the operator's `stores` table (weight, caps, pause)
-- with its change notification, the claim's allowance for capped stores, and the ready
-- notification limited to items that are due. Catalog changes only, in one transaction: the new
-- columns take their default from the catalog (no rewrite of job_items, however large), their
-- CHECKs are added NOT VALID; the validation and the index build that scan the big table are in
-- the next, non-transactional migration.
-- up --
ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD CONSTRAINT jobs_priority_range
    CHECK (priority BETWEEN -100 AND 100) NOT VALID;

-- Existing rows read 0 from the catalog; then the default goes, so that an insert leaving the
-- column out reaches the trigger with NULL and takes its job's priority.
ALTER TABLE job_items ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE job_items ALTER COLUMN priority DROP DEFAULT;
ALTER TABLE job_items ADD CONSTRAINT job_items_priority_range
    CHECK (priority BETWEEN -100 AND 100) NOT VALID;

CREATE FUNCTION job_items_fill_priority() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    SELECT j.priority INTO NEW.priority FROM jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END;
$$;

CREATE TRIGGER job_items_fill_priority
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.priority IS NULL)
    EXECUTE FUNCTION job_items_fill_priority();

CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_items_ready', s.instance_id)
    FROM (
        SELECT DISTINCT instance_id FROM ready_items
        WHERE status = 'PENDING' AND run_after <= now()
    ) s;
    RETURN NULL;
END;
$$;

CREATE TABLE stores (
    instance_id text PRIMARY KEY,
    weight integer NOT NULL DEFAULT 1,
    rpm_limit integer,
    max_in_flight integer,
    paused boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stores_instance_id_valid
        CHECK (
            btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
            AND instance_id !~ '[[:cntrl:]]'
        ),
    CONSTRAINT stores_weight_range CHECK (weight BETWEEN 1 AND 1000),
    CONSTRAINT stores_rpm_limit_positive CHECK (rpm_limit > 0),
    CONSTRAINT stores_max_in_flight_positive CHECK (max_in_flight > 0)
);

-- A store's rpm_limit as a GCRA "theoretical arrival time", kept apart from `stores` so that
-- the claim's writes never look like an operator's change (no stores_changed notification).
CREATE TABLE store_throttles (
    instance_id text PRIMARY KEY REFERENCES stores (instance_id) ON DELETE CASCADE,
    rpm_tat timestamptz NOT NULL
);

CREATE FUNCTION stores_notify_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('stores_changed', OLD.instance_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('stores_changed', NEW.instance_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER stores_notify_changed
    AFTER INSERT OR UPDATE OR DELETE ON stores
    FOR EACH ROW EXECUTE FUNCTION stores_notify_changed();

CREATE FUNCTION listener_claim_allowance(
    store text, wanted integer, OUT granted integer, OUT retry_in double precision
)
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    tolerance constant interval := interval '0.5 seconds';
    started constant timestamptz := now();
    is_paused boolean;
    rpm integer;
    in_flight_cap integer;
    in_flight integer;
    room integer;
    step interval;
    tat timestamptz;
BEGIN
    granted := wanted;
    SELECT s.paused, s.rpm_limit, s.max_in_flight INTO is_paused, rpm, in_flight_cap
    FROM stores s WHERE s.instance_id = store
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF is_paused THEN
        granted := 0;
        RETURN;
    END IF;
    IF in_flight_cap IS NOT NULL THEN
        SELECT count(*) INTO in_flight FROM job_items j
        WHERE j.instance_id = store AND j.status = 'PROCESSING';
        granted := least(granted, greatest(in_flight_cap - in_flight, 0));
    END IF;
    IF rpm IS NOT NULL AND granted > 0 THEN
        step := (interval '60 seconds' + tolerance) / rpm;
        SELECT t.rpm_tat INTO tat FROM store_throttles t WHERE t.instance_id = store;
        tat := coalesce(tat, started);
        room := granted;
        granted := 0;
        WHILE granted < room AND tat <= started LOOP
            tat := greatest(tat, started - tolerance) + step;
            granted := granted + 1;
        END LOOP;
        IF granted > 0 THEN
            INSERT INTO store_throttles AS t (instance_id, rpm_tat) VALUES (store, tat)
            ON CONFLICT (instance_id) DO UPDATE SET rpm_tat = excluded.rpm_tat;
        END IF;
        IF granted < room THEN
            retry_in := greatest(0, extract(epoch FROM tat - started));
        END IF;
    END IF;
END;
$$;

-- down --
DROP FUNCTION listener_claim_allowance(text, integer);
DROP TABLE store_throttles;
DROP TABLE stores;
DROP FUNCTION stores_notify_changed();
CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_items_ready', s.instance_id)
    FROM (SELECT DISTINCT instance_id FROM ready_items WHERE status = 'PENDING') s;
    RETURN NULL;
END;
$$;

DROP TRIGGER job_items_fill_priority ON job_items;
DROP FUNCTION job_items_fill_priority();
ALTER TABLE job_items DROP COLUMN priority;
ALTER TABLE jobs DROP COLUMN priority;
