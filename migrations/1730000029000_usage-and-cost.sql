-- What each store costs: every completed item keeps the usage its call reported, the model and
-- the tier that served it (realtime, flex or batch; NULL when no priced call served it). A
-- trigger copies each completion's tokens into a per-store ledger in the statement that writes
-- it, whoever writes it (the completer, the Batch API's outcome writer, an operator), and a
-- compactor folds the ledger into one row per store, day (UTC), model and tier, and per month.
-- Reports read those small tables, never job_items: their cost does not grow with the history,
-- and the month's figures survive retention deleting the jobs. Money is computed when read, from the
-- tokens and the price table (a corrected price reprices the past).
-- up --
ALTER TABLE job_items
    ADD COLUMN usage jsonb,
    ADD COLUMN model text,
    ADD COLUMN served_tier text,
    -- When its handler first deferred it (DeferItem: flex had no capacity), for a handler that
    -- stops waiting after a while from there; the claim of the attempt that was deferred.
    ADD COLUMN deferred_since timestamptz,
    ADD CONSTRAINT job_items_usage_object CHECK (jsonb_typeof(usage) = 'object'),
    ADD CONSTRAINT job_items_served_tier_valid
        CHECK (served_tier IN ('realtime', 'flex', 'batch'));

-- A token count of a usage object: a JSON number from 0 to 10^15 (rounded), anything else 0.
-- Never raises: a malformed usage must not fail the statement that completes its item.
CREATE FUNCTION listener_usage_tokens(usage jsonb, field text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(usage -> field) = 'number'
            AND (usage ->> field)::numeric BETWEEN 0 AND 1e15
        THEN round((usage ->> field)::numeric)::bigint
        ELSE 0
    END
$$;

-- Completions not yet folded into store_usage_daily: appended to (never updated), so writers
-- of outcomes never wait on each other for it.
CREATE TABLE store_usage_recent (
    instance_id text NOT NULL,
    day date NOT NULL,
    model text NOT NULL,
    served_tier text NOT NULL,
    items bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_store_usage_recent_store_day ON store_usage_recent (instance_id, day);

-- One row per store, day (UTC), model and tier: written by the compactor alone (one process
-- of the fleet at a time).
CREATE TABLE store_usage_daily (
    instance_id text NOT NULL,
    day date NOT NULL,
    model text NOT NULL,
    served_tier text NOT NULL,
    items bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    PRIMARY KEY (instance_id, day, model, served_tier)
);

CREATE INDEX idx_store_usage_daily_day ON store_usage_daily (day);

-- The same by month (its first day), written with the daily rows in the compactor's statement:
-- the fleet's month reads stores x models x tiers rows, not stores x days x models x tiers.
CREATE TABLE store_usage_monthly (
    instance_id text NOT NULL,
    month date NOT NULL,
    model text NOT NULL,
    served_tier text NOT NULL,
    items bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    PRIMARY KEY (instance_id, month, model, served_tier)
);

CREATE INDEX idx_store_usage_monthly_month ON store_usage_monthly (month);

-- Row-level, filtered by its WHEN clause before any function runs: a claim, a lease's renewal
-- or a cancel costs nothing here, and an item counts once, when it becomes COMPLETED with a
-- served tier (a later update of a completed item adds nothing). One ledger row per item; the
-- compactor folds them every minute.
CREATE FUNCTION job_items_record_usage() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO store_usage_recent (
        instance_id, day, model, served_tier, items, prompt_tokens, cached_tokens,
        completion_tokens
    ) VALUES (
        NEW.instance_id, (coalesce(NEW.completed_at, now()) AT TIME ZONE 'UTC')::date,
        coalesce(NEW.model, ''), NEW.served_tier, 1,
        listener_usage_tokens(NEW.usage, 'prompt_tokens'),
        listener_usage_tokens(NEW.usage, 'cached_tokens'),
        listener_usage_tokens(NEW.usage, 'completion_tokens')
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_items_record_usage
    AFTER UPDATE ON job_items
    FOR EACH ROW
    WHEN (
        NEW.status = 'COMPLETED' AND NEW.served_tier IS NOT NULL
        AND (OLD.status <> 'COMPLETED' OR OLD.served_tier IS NULL)
    )
    EXECUTE FUNCTION job_items_record_usage();

-- An operator's retry starts an item afresh: its deferral clock too.
CREATE OR REPLACE FUNCTION listener_retry_job(job_id bigint) RETURNS jsonb
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
        -- A fresh start: a flex item tries flex again (FLEX_FALLBACK_SECONDS counts anew), and
        -- an item an older worker failed while flagged is not left out of the claims.
        deferred_since = NULL,
        in_backoff = false,
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

-- down --
CREATE OR REPLACE FUNCTION listener_retry_job(job_id bigint) RETURNS jsonb
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

DROP TRIGGER job_items_record_usage ON job_items;
DROP FUNCTION job_items_record_usage();
DROP TABLE store_usage_monthly;
DROP TABLE store_usage_daily;
DROP TABLE store_usage_recent;
DROP FUNCTION listener_usage_tokens(jsonb, text);
ALTER TABLE job_items
    DROP CONSTRAINT job_items_served_tier_valid,
    DROP CONSTRAINT job_items_usage_object,
    DROP COLUMN deferred_since,
    DROP COLUMN served_tier,
    DROP COLUMN model,
    DROP COLUMN usage;
