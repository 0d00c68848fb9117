-- The desired schema. `listener migrate check` proves that the migrations reach exactly this;
-- `listener migrate diff` drafts the next migration from the difference.

CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    -- A store id travels as a NOTIFY payload (8000 bytes at most), as a btree key and in the
    -- operator's log lines (a control character would forge a line).
    CONSTRAINT jobs_instance_id_valid
        CHECK (
            btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
            AND instance_id !~ '[[:cntrl:]]'
        )
);

CREATE INDEX idx_jobs_instance_id ON jobs (instance_id);

CREATE TABLE job_items (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    product_id text,
    status text NOT NULL DEFAULT 'PENDING',
    payload jsonb,
    result jsonb,
    error text,
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    completed_at timestamptz,
    instance_id text NOT NULL,
    claimed_by text,
    lease_expires_at timestamptz,
    run_after timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_items_status_check
        CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')),
    CONSTRAINT job_items_instance_id_valid
        CHECK (
            btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
            AND instance_id !~ '[[:cntrl:]]'
        ),
    -- A btree entry holds at most 2704 bytes: refuse a longer product id with a clear name.
    CONSTRAINT job_items_product_id_length CHECK (octet_length(product_id) <= 1024)
);

-- The checklist's indexes (the first three existed before the optimisation).
CREATE INDEX idx_job_items_status ON job_items (status);
CREATE INDEX idx_job_items_job_id ON job_items (job_id);
CREATE INDEX idx_job_items_product ON job_items (product_id);
CREATE INDEX idx_job_items_instance_status_id ON job_items (instance_id, status, id);
CREATE INDEX idx_job_items_status_id ON job_items (status, id);

-- "Next PENDING items of store X" and "which stores have PENDING items" are range scans of
-- this small index: finished rows never enter it, so its size is the backlog, not the history.
CREATE INDEX idx_job_items_pending ON job_items (instance_id, id) WHERE status = 'PENDING';

-- "Is this job finished?" after each completion batch, without walking the job's done items.
CREATE INDEX idx_job_items_open_job ON job_items (job_id)
    WHERE status IN ('PENDING', 'PROCESSING');

-- Clients written before instance_id existed insert without it: take it from the job.
CREATE FUNCTION job_items_fill_instance_id() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    SELECT j.instance_id INTO NEW.instance_id FROM jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END;
$$;

CREATE TRIGGER job_items_fill_instance_id
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.instance_id IS NULL)
    EXECUTE FUNCTION job_items_fill_instance_id();

-- One notification per distinct store per statement: a 10,000-item insert is one NOTIFY,
-- and Postgres folds identical notifications within a transaction.
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

-- Items that return to PENDING (retry, reaper, an operator's UPDATE) are announced too.
CREATE TRIGGER job_items_notify_update
    AFTER UPDATE ON job_items
    REFERENCING NEW TABLE AS ready_items
    FOR EACH STATEMENT EXECUTE FUNCTION job_items_notify_ready();

-- The shared rate limiter: one row per limiter, a GCRA "theoretical arrival time" per budget.
CREATE TABLE rate_limiters (
    name text PRIMARY KEY,
    request_tat timestamptz NOT NULL DEFAULT now(),
    token_tat timestamptz NOT NULL DEFAULT now(),
    paused_until timestamptz NOT NULL DEFAULT now(),
    rate_limited_total bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per live worker process: its heartbeat and counters, so any process (or `listener api`)
-- can report the whole fleet's figures.
CREATE TABLE worker_heartbeats (
    worker_id text PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    listener_connected boolean NOT NULL DEFAULT false,
    stats jsonb NOT NULL DEFAULT '{}'::jsonb
);
