-- Tiers per job and the OpenAI Batch API path (issue 27): `jobs.tier` (NULL: the kind's
-- default), each item's resolved tier (`job_items.tier`, filled like its kind and priority),
-- the kinds' default tier and `auto` rule in `job_kinds`, our record of OpenAI batches
-- (`openai_batches`) and the batch holding an item (`job_items.openai_batch_id`).
-- idx_job_items_pending leaves batch-tier items out (the real-time claim never reads them) and
-- the collector gets an index of its own. One transaction: the new columns take ACCESS
-- EXCLUSIVE on job_items for a moment (a NOT NULL column with a constant default is not a
-- rewrite), and the pending index is rebuilt under it (its size is the backlog, not the table).
-- up --
CREATE TABLE openai_batches (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    model text NOT NULL,
    state text NOT NULL DEFAULT 'collected',
    input_file_id text,
    openai_batch_id text UNIQUE,
    status text,  -- OpenAI's: validating, in_progress, finalizing, completed, failed, ...
    request_count integer NOT NULL DEFAULT 0,
    completed_count integer NOT NULL DEFAULT 0,
    failed_count integer NOT NULL DEFAULT 0,
    -- Our estimate of its prompt tokens: what it adds to OpenAI's enqueued-token count.
    estimated_tokens bigint NOT NULL DEFAULT 0,
    output_file_id text,
    error_file_id text,
    outcome text,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    uploaded_at timestamptz,
    submitted_at timestamptz,
    polled_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT openai_batches_state_valid
        CHECK (state IN ('collected', 'uploaded', 'submitting', 'submitted', 'finished'))
);

CREATE INDEX idx_openai_batches_open ON openai_batches (id) WHERE state <> 'finished';

ALTER TABLE jobs
    ADD COLUMN tier text,
    ADD CONSTRAINT jobs_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex', 'auto'));

ALTER TABLE job_items
    ADD COLUMN tier text NOT NULL DEFAULT 'realtime',
    ADD COLUMN openai_batch_id bigint REFERENCES openai_batches (id) ON DELETE SET NULL,
    ADD CONSTRAINT job_items_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex'));
ALTER TABLE job_items ALTER COLUMN tier DROP DEFAULT;

ALTER TABLE job_kinds
    ADD COLUMN tier text NOT NULL DEFAULT 'realtime',
    ADD COLUMN batchable boolean NOT NULL DEFAULT false,
    ADD COLUMN auto_batch_min_items integer,
    ADD COLUMN auto_batch_max_priority integer,
    ADD CONSTRAINT job_kinds_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex', 'auto'));

DROP INDEX idx_job_items_pending;
CREATE INDEX idx_job_items_pending ON job_items (instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND NOT in_backoff AND tier <> 'batch';
CREATE INDEX idx_job_items_batch_pending
    ON job_items (kind, instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND tier = 'batch';
CREATE INDEX idx_job_items_in_batch ON job_items (openai_batch_id)
    WHERE status = 'PROCESSING' AND openai_batch_id IS NOT NULL;

CREATE FUNCTION listener_item_tier(job_tier text, item_kind text, item_priority integer)
    RETURNS text
    LANGUAGE plpgsql STABLE AS $$
DECLARE
    kind_tier text;
    can_batch boolean;
    max_priority integer;
    wanted text;
BEGIN
    SELECT k.tier, k.batchable, k.auto_batch_max_priority
    INTO kind_tier, can_batch, max_priority
    FROM job_kinds k WHERE k.name = item_kind;
    wanted := coalesce(job_tier, kind_tier, 'realtime');
    IF wanted = 'auto' THEN
        RETURN CASE WHEN can_batch AND item_priority <= max_priority
            THEN 'batch' ELSE 'realtime' END;
    END IF;
    IF wanted = 'batch' AND can_batch IS FALSE THEN
        RAISE EXCEPTION 'kind % cannot run on the batch tier (its handler cannot batch)',
            item_kind USING ERRCODE = 'check_violation';
    END IF;
    RETURN wanted;
END;
$$;

CREATE OR REPLACE FUNCTION job_items_fill_priority() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    job_tier text;
BEGIN
    SELECT coalesce(NEW.priority, j.priority), coalesce(NEW.kind, j.kind), j.tier
    INTO NEW.priority, NEW.kind, job_tier
    FROM jobs j WHERE j.id = NEW.job_id;
    IF NEW.tier IS NULL THEN
        NEW.tier := listener_item_tier(job_tier, NEW.kind, NEW.priority);
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER job_items_fill_priority ON job_items;
CREATE TRIGGER job_items_fill_priority
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.priority IS NULL OR NEW.kind IS NULL OR NEW.tier IS NULL)
    EXECUTE FUNCTION job_items_fill_priority();

CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_items_ready', CASE WHEN s.kind = 'product_description'
        THEN s.instance_id ELSE s.instance_id || E'\x1f' || s.kind END)
    FROM (
        SELECT DISTINCT instance_id, kind FROM ready_items
        WHERE status = 'PENDING' AND run_after <= now() AND tier <> 'batch'
    ) s;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION listener_cancel_job(job_id bigint) RETURNS jsonb
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    job jobs;
    cancelled integer := 0;
    in_flight integer := 0;
BEGIN
    -- The job row first, as every writer that returns items to PENDING does: they wait for
    -- this commit and then see CANCELLED.
    SELECT * INTO job FROM jobs j WHERE j.id = listener_cancel_job.job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', listener_cancel_job.job_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF job.completed_at IS NOT NULL THEN
        RETURN jsonb_build_object(
            'job_id', job.id, 'instance_id', job.instance_id, 'status', job.status,
            'changed', false, 'cancelled', 0, 'in_flight', 0, 'finished', true
        );
    END IF;
    UPDATE jobs SET status = 'CANCELLED', cancelled_at = coalesce(cancelled_at, now()),
        updated_at = now()
    WHERE id = job.id;
    UPDATE job_items i
    SET status = 'CANCELLED', completed_at = now(), updated_at = now()
    WHERE i.job_id = job.id
      AND (i.status = 'PENDING' OR (i.status = 'PROCESSING' AND i.openai_batch_id IS NOT NULL));
    GET DIAGNOSTICS cancelled = ROW_COUNT;
    -- Wait for outcomes being written now, and make later ones wait for this commit: then
    -- either this count sees an outcome, or its writer's finish_jobs (after it) sees the cancel.
    -- (No deadlock: an outcome that returns an item to PENDING locks the job row first, and a
    -- final one waits for nothing this holds.)
    PERFORM 1 FROM job_items i
    WHERE i.job_id = job.id AND i.status = 'PROCESSING'
    FOR SHARE;
    SELECT count(*) INTO in_flight FROM job_items i
    WHERE i.job_id = job.id AND i.status = 'PROCESSING';
    IF in_flight = 0 THEN
        UPDATE jobs SET completed_at = now(), updated_at = now() WHERE id = job.id;
    END IF;
    RETURN jsonb_build_object(
        'job_id', job.id, 'instance_id', job.instance_id, 'status', 'CANCELLED',
        'changed', job.status <> 'CANCELLED' OR cancelled > 0,
        'cancelled', cancelled, 'in_flight', in_flight, 'finished', in_flight = 0
    );
END;
$$;

CREATE OR REPLACE FUNCTION listener_claim_allowance(
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
        -- Items in an OpenAI batch hold no real-time slot: they are not in flight here.
        SELECT count(*) INTO in_flight FROM job_items j
        WHERE j.instance_id = store AND j.status = 'PROCESSING' AND j.openai_batch_id IS NULL;
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
CREATE OR REPLACE FUNCTION listener_claim_allowance(
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

CREATE OR REPLACE FUNCTION listener_cancel_job(job_id bigint) RETURNS jsonb
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    job jobs;
    cancelled integer := 0;
    in_flight integer := 0;
BEGIN
    -- The job row first, as every writer that returns items to PENDING does: they wait for
    -- this commit and then see CANCELLED.
    SELECT * INTO job FROM jobs j WHERE j.id = listener_cancel_job.job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', listener_cancel_job.job_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF job.completed_at IS NOT NULL THEN
        RETURN jsonb_build_object(
            'job_id', job.id, 'instance_id', job.instance_id, 'status', job.status,
            'changed', false, 'cancelled', 0, 'in_flight', 0, 'finished', true
        );
    END IF;
    UPDATE jobs SET status = 'CANCELLED', cancelled_at = coalesce(cancelled_at, now()),
        updated_at = now()
    WHERE id = job.id;
    UPDATE job_items i
    SET status = 'CANCELLED', completed_at = now(), updated_at = now()
    WHERE i.job_id = job.id AND i.status = 'PENDING';
    GET DIAGNOSTICS cancelled = ROW_COUNT;
    -- Wait for outcomes being written now, and make later ones wait for this commit: then
    -- either this count sees an outcome, or its writer's finish_jobs (after it) sees the cancel.
    -- (No deadlock: an outcome that returns an item to PENDING locks the job row first, and a
    -- final one waits for nothing this holds.)
    PERFORM 1 FROM job_items i
    WHERE i.job_id = job.id AND i.status = 'PROCESSING'
    FOR SHARE;
    SELECT count(*) INTO in_flight FROM job_items i
    WHERE i.job_id = job.id AND i.status = 'PROCESSING';
    IF in_flight = 0 THEN
        UPDATE jobs SET completed_at = now(), updated_at = now() WHERE id = job.id;
    END IF;
    RETURN jsonb_build_object(
        'job_id', job.id, 'instance_id', job.instance_id, 'status', 'CANCELLED',
        'changed', job.status <> 'CANCELLED' OR cancelled > 0,
        'cancelled', cancelled, 'in_flight', in_flight, 'finished', in_flight = 0
    );
END;
$$;

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

DROP TRIGGER job_items_fill_priority ON job_items;
CREATE OR REPLACE FUNCTION job_items_fill_priority() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(NEW.priority, j.priority), coalesce(NEW.kind, j.kind)
    INTO NEW.priority, NEW.kind
    FROM jobs j WHERE j.id = NEW.job_id;
    RETURN NEW;
END;
$$;
CREATE TRIGGER job_items_fill_priority
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.priority IS NULL OR NEW.kind IS NULL)
    EXECUTE FUNCTION job_items_fill_priority();
DROP FUNCTION listener_item_tier(text, text, integer);

DROP INDEX idx_job_items_in_batch;
DROP INDEX idx_job_items_batch_pending;
DROP INDEX idx_job_items_pending;
CREATE INDEX idx_job_items_pending ON job_items (instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND NOT in_backoff;

ALTER TABLE job_kinds
    DROP CONSTRAINT job_kinds_tier_valid,
    DROP COLUMN auto_batch_max_priority,
    DROP COLUMN auto_batch_min_items,
    DROP COLUMN batchable,
    DROP COLUMN tier;
ALTER TABLE job_items
    DROP CONSTRAINT job_items_tier_valid,
    DROP COLUMN openai_batch_id,
    DROP COLUMN tier;
ALTER TABLE jobs DROP CONSTRAINT jobs_tier_valid, DROP COLUMN tier;
DROP TABLE openai_batches;
