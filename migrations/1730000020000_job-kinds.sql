-- Job kinds: a job names the kind of work its items need (`jobs.kind`, carried into
-- `job_items.kind` like the priority), with options of its own over its store's defaults; the
-- kinds the fleet's workers serve are registered in `job_kinds`. Existing jobs and every insert
-- that names no kind are today's product description.
-- up --
ALTER TABLE jobs
    ADD COLUMN kind text NOT NULL DEFAULT 'product_description',
    ADD COLUMN options jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD CONSTRAINT jobs_kind_valid CHECK (kind ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    ADD CONSTRAINT jobs_options_object CHECK (jsonb_typeof(options) = 'object');

-- A NOT NULL column with a constant default is added without rewriting the table; the default
-- is then dropped, so an insert that leaves the kind out takes its job's (the fill trigger).
ALTER TABLE job_items ADD COLUMN kind text NOT NULL DEFAULT 'product_description';
ALTER TABLE job_items ALTER COLUMN kind DROP DEFAULT;

ALTER TABLE stores
    ADD COLUMN options jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD CONSTRAINT stores_options_object CHECK (jsonb_typeof(options) = 'object');

CREATE TABLE job_kinds (
    name text PRIMARY KEY,
    -- The options a job of this kind may carry (NULL: any), and those it must have.
    options text[],
    required_options text[] NOT NULL DEFAULT '{}',
    -- The limiter row its requests draw from; NULL: none (a kind that calls no metered API).
    budget text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_kinds_name_valid CHECK (name ~ '^[a-z][a-z0-9_.-]{0,62}$')
);

CREATE OR REPLACE FUNCTION job_items_fill_priority() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(NEW.priority, j.priority), coalesce(NEW.kind, j.kind)
    INTO NEW.priority, NEW.kind
    FROM jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END;
$$;

DROP TRIGGER job_items_fill_priority ON job_items;
CREATE TRIGGER job_items_fill_priority
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.priority IS NULL OR NEW.kind IS NULL)
    EXECUTE FUNCTION job_items_fill_priority();

CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_items_ready', CASE WHEN s.kind = 'product_description'
        THEN s.instance_id ELSE s.instance_id || E'\x1f' || s.kind END)
    FROM (
        SELECT DISTINCT instance_id, kind FROM ready_items
        WHERE status = 'PENDING' AND run_after <= now()
    ) s;
    RETURN NULL;
END;
$$;

-- down --
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

DROP TRIGGER job_items_fill_priority ON job_items;
CREATE OR REPLACE FUNCTION job_items_fill_priority() RETURNS trigger
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

DROP TABLE job_kinds;
ALTER TABLE stores DROP CONSTRAINT stores_options_object, DROP COLUMN options;
ALTER TABLE job_items DROP COLUMN kind;
ALTER TABLE jobs
    DROP CONSTRAINT jobs_options_object,
    DROP CONSTRAINT jobs_kind_valid,
    DROP COLUMN options,
    DROP COLUMN kind;
