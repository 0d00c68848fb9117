-- The job lifecycle: a job's start, its cancel and retry (SQL functions any program can call),
-- `NOTIFY job_finished` when it ends, and the error history of a retried item. Catalog changes
-- only (nullable columns without a default rewrite nothing); the status CHECK and the retention
-- index, which scan the tables, are in the next, non-transactional migration.
-- up --
ALTER TABLE jobs
    ADD COLUMN started_at timestamptz,
    ADD COLUMN cancelled_at timestamptz;

ALTER TABLE job_items ADD COLUMN error_history jsonb;

-- A job enters PROCESSING when its first item is claimed, whoever claims it. SKIP LOCKED: a
-- job row held by a cancel or a retry is being given its status by them, and waiting for it
-- while this statement holds item locks that the cancel waits for would deadlock.
CREATE FUNCTION jobs_mark_started() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs
    SET status = 'PROCESSING', started_at = coalesce(started_at, now()), updated_at = now()
    WHERE id IN (
        SELECT j.id FROM jobs j
        WHERE j.id IN (SELECT c.job_id FROM claimed_items c WHERE c.status = 'PROCESSING')
          AND j.status = 'PENDING'
        ORDER BY j.id
        FOR NO KEY UPDATE SKIP LOCKED
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_items_mark_job_started
    AFTER UPDATE ON job_items
    REFERENCING NEW TABLE AS claimed_items
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_mark_started();

-- `NOTIFY job_finished` in the transaction that ends a job (any final status): a subscriber
-- never hears of it before the rows are there, and hears once per ending.
CREATE FUNCTION jobs_notify_finished() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_finished', json_build_object(
        'job_id', NEW.id,
        'instance_id', NEW.instance_id,
        'status', NEW.status,
        'completed', count(*) FILTER (WHERE i.status = 'COMPLETED'),
        'failed', count(*) FILTER (WHERE i.status = 'FAILED'),
        'cancelled', count(*) FILTER (WHERE i.status = 'CANCELLED')
    )::text)
    FROM job_items i
    WHERE i.job_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_finished
    AFTER UPDATE OF completed_at ON jobs
    FOR EACH ROW WHEN (OLD.completed_at IS NULL AND NEW.completed_at IS NOT NULL)
    EXECUTE FUNCTION jobs_notify_finished();

-- Cancel a job: its PENDING items become CANCELLED at once; items in flight finish and keep
-- their result, and none goes back to PENDING (a retry or a release of one becomes CANCELLED);
-- the job ends CANCELLED when the last of them is written. Idempotent: a finished job is left
-- as it is, and the answer says so ("changed": false).
CREATE FUNCTION listener_cancel_job(job_id bigint) RETURNS jsonb
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

-- Cancel every unfinished job of a store (an app uninstalled), oldest first.
CREATE FUNCTION listener_cancel_store(instance_id text) RETURNS jsonb
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    open_job bigint;
    answer jsonb;
    jobs_changed integer := 0;
    cancelled integer := 0;
    in_flight integer := 0;
BEGIN
    FOR open_job IN
        SELECT j.id FROM jobs j
        WHERE j.instance_id = listener_cancel_store.instance_id AND j.completed_at IS NULL
        ORDER BY j.id
    LOOP
        answer := listener_cancel_job(open_job);
        jobs_changed := jobs_changed + (answer ->> 'changed')::boolean::integer;
        cancelled := cancelled + (answer ->> 'cancelled')::integer;
        in_flight := in_flight + (answer ->> 'in_flight')::integer;
    END LOOP;
    RETURN jsonb_build_object(
        'instance_id', listener_cancel_store.instance_id, 'jobs', jobs_changed,
        'cancelled', cancelled, 'in_flight', in_flight, 'changed', jobs_changed > 0
    );
END;
$$;

-- Retry a job's FAILED items: back to PENDING with their attempts reset, each failure kept in
-- `error_history` (and the last in `error` until the next outcome); the job is PROCESSING
-- again (and sends `job_finished` again when it ends). The UPDATE's trigger notifies the
-- store like any store with work. A cancelled job is not reopened.
CREATE FUNCTION listener_retry_job(job_id bigint) RETURNS jsonb
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    job jobs;
    retried integer := 0;
BEGIN
    SELECT * INTO job FROM jobs j WHERE j.id = listener_retry_job.job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', listener_retry_job.job_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF job.status = 'CANCELLED' THEN
        RETURN jsonb_build_object(
            'job_id', job.id, 'instance_id', job.instance_id, 'status', job.status,
            'changed', false, 'retried', 0
        );
    END IF;
    UPDATE job_items i
    SET status = 'PENDING',
        attempts = 0,
        error_history = coalesce(i.error_history, '[]'::jsonb) || jsonb_build_array(
            jsonb_build_object(
                'error', i.error, 'attempts', i.attempts, 'failed_at', i.completed_at,
                'retried_at', now()
            )
        ),
        completed_at = NULL,
        run_after = now(),
        claimed_by = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    WHERE i.job_id = job.id AND i.status = 'FAILED';
    GET DIAGNOSTICS retried = ROW_COUNT;
    IF retried > 0 THEN
        UPDATE jobs SET status = 'PROCESSING', completed_at = NULL, updated_at = now()
        WHERE id = job.id;
    END IF;
    RETURN jsonb_build_object(
        'job_id', job.id, 'instance_id', job.instance_id,
        'status', CASE WHEN retried > 0 THEN 'PROCESSING' ELSE job.status END,
        'changed', retried > 0, 'retried', retried
    );
END;
$$;

-- Retry the FAILED items of every job of a store, oldest job first.
CREATE FUNCTION listener_retry_store(instance_id text) RETURNS jsonb
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    failed_job bigint;
    answer jsonb;
    jobs_changed integer := 0;
    retried integer := 0;
BEGIN
    FOR failed_job IN
        SELECT DISTINCT i.job_id FROM job_items i
        WHERE i.instance_id = listener_retry_store.instance_id AND i.status = 'FAILED'
        ORDER BY i.job_id
    LOOP
        answer := listener_retry_job(failed_job);
        jobs_changed := jobs_changed + (answer ->> 'changed')::boolean::integer;
        retried := retried + (answer ->> 'retried')::integer;
    END LOOP;
    RETURN jsonb_build_object(
        'instance_id', listener_retry_store.instance_id, 'jobs', jobs_changed,
        'retried', retried, 'changed', jobs_changed > 0
    );
END;
$$;

-- down --
DROP FUNCTION listener_retry_store(text);
DROP FUNCTION listener_retry_job(bigint);
DROP FUNCTION listener_cancel_store(text);
DROP FUNCTION listener_cancel_job(bigint);
DROP TRIGGER jobs_notify_finished ON jobs;
DROP FUNCTION jobs_notify_finished();
DROP TRIGGER job_items_mark_job_started ON job_items;
DROP FUNCTION jobs_mark_started();
ALTER TABLE job_items DROP COLUMN error_history;
ALTER TABLE jobs DROP COLUMN cancelled_at, DROP COLUMN started_at;
