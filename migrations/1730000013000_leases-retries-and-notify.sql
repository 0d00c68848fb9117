-- Leases (a dead worker's items come back), a run-after time for retry backoff, a status CHECK,
-- and the NOTIFY triggers that replace polling. Quick catalog changes only: the scans and index
-- builds on the big table are in the next, non-transactional migration.
-- up --
ALTER TABLE job_items
    ADD COLUMN claimed_by text,
    ADD COLUMN lease_expires_at timestamptz,
    -- now() is stable, so existing rows take it from the catalog: no table rewrite.
    ADD COLUMN run_after timestamptz NOT NULL DEFAULT now();

ALTER TABLE job_items ADD CONSTRAINT job_items_status_check
    CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')) NOT VALID;

ALTER TABLE jobs ADD COLUMN completed_at timestamptz;

CREATE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_items_ready', s.instance_id)
    FROM (SELECT DISTINCT instance_id FROM ready_items WHERE status = 'PENDING') s;
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_items_notify_insert
    AFTER INSERT ON job_items
    REFERENCING NEW TABLE AS ready_items
    FOR EACH STATEMENT EXECUTE FUNCTION job_items_notify_ready();

CREATE TRIGGER job_items_notify_update
    AFTER UPDATE ON job_items
    REFERENCING NEW TABLE AS ready_items
    FOR EACH STATEMENT EXECUTE FUNCTION job_items_notify_ready();

CREATE TABLE rate_limiters (
    name text PRIMARY KEY,
    request_tat timestamptz NOT NULL DEFAULT now(),
    token_tat timestamptz NOT NULL DEFAULT now(),
    paused_until timestamptz NOT NULL DEFAULT now(),
    rate_limited_total bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE worker_heartbeats (
    worker_id text PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    listener_connected boolean NOT NULL DEFAULT false,
    stats jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- down --
DROP TABLE worker_heartbeats;
DROP TABLE rate_limiters;
DROP TRIGGER job_items_notify_update ON job_items;
DROP TRIGGER job_items_notify_insert ON job_items;
DROP FUNCTION job_items_notify_ready();
ALTER TABLE jobs DROP COLUMN completed_at;
ALTER TABLE job_items DROP CONSTRAINT job_items_status_check;
ALTER TABLE job_items
    DROP COLUMN run_after,
    DROP COLUMN lease_expires_at,
    DROP COLUMN claimed_by;
