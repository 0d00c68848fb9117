-- The desired schema. `listener migrate check` proves that the migrations reach exactly this;
-- `listener migrate diff` drafts the next migration from the difference.

CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,  -- when the job ended, whatever its final status
    -- Orders the store's OWN items (higher first); never the shares between stores.
    priority integer NOT NULL DEFAULT 0,
    -- A store id travels as a NOTIFY payload (8000 bytes at most), as a btree key and in the
    -- operator's log lines (a control character would forge a line).
    CONSTRAINT jobs_instance_id_valid
        CHECK (
            btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
            AND instance_id !~ '[[:cntrl:]]'
        ),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -100 AND 100),
    started_at timestamptz,  -- its first item's claim
    cancelled_at timestamptz,
    -- The kind of work its items need (a handler registered under this name), and the job's own
    -- options for it, merged over its store's (`stores.options`).
    kind text NOT NULL DEFAULT 'product_description',
    options jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT jobs_kind_valid CHECK (kind ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    CONSTRAINT jobs_options_object CHECK (jsonb_typeof(options) = 'object'),
    -- How its items reach OpenAI (docs/guides/cost-tiers.md): NULL is its kind's default tier;
    -- 'auto' is resolved into each item's own tier (job_items.tier) when the items are written.
    tier text,
    CONSTRAINT jobs_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex', 'auto'))
);

CREATE INDEX idx_jobs_instance_id ON jobs (instance_id);

-- Retention deletes the oldest finished jobs first.
CREATE INDEX idx_jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;

-- The reaper's sweep for jobs never closed reads the open jobs only.
CREATE INDEX idx_jobs_open ON jobs (id) WHERE completed_at IS NULL;

-- OpenAI batches of ours, one row per batch file (listener/batches/): recorded before and after
-- each call to OpenAI, so that every step can be repeated after a crash. `state` is our step:
-- collected (items taken) -> uploaded (input file at OpenAI) -> submitting (batches.create
-- called, or about to be: a restart adopts the batch by its metadata) -> submitted (polled)
-- -> finished (every item written or returned; `outcome` says how it ended).
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

-- Each step reads the batches not finished yet.
CREATE INDEX idx_openai_batches_open ON openai_batches (id) WHERE state <> 'finished';

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
    -- No default: an insert that leaves it out gets its job's (job_items_fill_priority).
    priority integer NOT NULL,
    -- Each failure a retry put back to PENDING: [{error, attempts, failed_at, retried_at}].
    error_history jsonb,
    -- No default either: its job's (job_items_fill_priority), so a process serving some kinds
    -- claims only those.
    kind text NOT NULL,
    -- PENDING and waiting out a backoff (a retry, a release with a delay, an insert dated
    -- later): out of the claim's index until the promote step (promote_due) clears it at its
    -- run_after. Set by the writers that put an item in backoff (finish_items, the insert
    -- trigger job_items_mark_backoff); meaningless once the item leaves PENDING.
    in_backoff boolean NOT NULL DEFAULT false,
    -- The tier the item is served on, resolved from its job's (never 'auto'): no default, the
    -- fill trigger resolves it (listener_item_tier) unless the insert names it (the producer's
    -- COPY does). 'batch' items are collected into OpenAI batch files, never claimed one by one.
    tier text NOT NULL,
    -- The batch that holds (or held) it: status PROCESSING and claimed_by 'batch:<id>' while
    -- the batch runs, with no lease (the reaper leaves it to the batch path).
    openai_batch_id bigint REFERENCES openai_batches (id) ON DELETE SET NULL,
    -- What the item's call cost: the usage it reported ({prompt_tokens, completion_tokens,
    -- cached_tokens}), the model that answered, and the tier that served it (NULL: no priced
    -- call served it). Money is computed when read, from store_usage_* and the price table.
    usage jsonb,
    model text,
    served_tier text,
    -- When its handler first deferred it (DeferItem: flex had no capacity), for a handler that
    -- stops waiting after a while from there; the claim of the attempt that was deferred.
    deferred_since timestamptz,
    CONSTRAINT job_items_usage_object CHECK (jsonb_typeof(usage) = 'object'),
    CONSTRAINT job_items_served_tier_valid CHECK (served_tier IN ('realtime', 'flex', 'batch')),
    CONSTRAINT job_items_status_check
        CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    CONSTRAINT job_items_instance_id_valid
        CHECK (
            btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
            AND instance_id !~ '[[:cntrl:]]'
        ),
    -- A btree entry holds at most 2704 bytes: refuse a longer product id with a clear name.
    CONSTRAINT job_items_product_id_length CHECK (octet_length(product_id) <= 1024),
    CONSTRAINT job_items_priority_range CHECK (priority BETWEEN -100 AND 100),
    CONSTRAINT job_items_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex'))
);

-- The checklist's indexes (the first three existed before the optimisation).
CREATE INDEX idx_job_items_status ON job_items (status);
CREATE INDEX idx_job_items_job_id ON job_items (job_id);
CREATE INDEX idx_job_items_product ON job_items (product_id);
CREATE INDEX idx_job_items_instance_status_id ON job_items (instance_id, status, id);
CREATE INDEX idx_job_items_status_id ON job_items (status, id);

-- "Next PENDING items of store X" and "which stores have PENDING items" are range scans of
-- this small index: finished rows never enter it, so its size is the backlog, not the history.
-- Items waiting out a backoff are not in it either (in_backoff): the index orders priority
-- before due time, so a store's higher-priority items in backoff would sit before its due ones
-- and every claim would read past them all. Within a store: priority first, then due time,
-- then id. An item an operator's UPDATE dates later is not flagged: it stays in this index, a
-- claim reads past it until it is due (never takes it before), and the rebuild wakes its store
-- then; a rare path, left at that cost. Batch-tier items are not in it: the real-time claim
-- never takes them nor reads past them.
CREATE INDEX idx_job_items_pending ON job_items (instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND NOT in_backoff AND tier <> 'batch';

-- The items in backoff, by due time: the promote step reads the head of this range (the items
-- due now, and when the next one is), whatever their number.
CREATE INDEX idx_job_items_backoff ON job_items (run_after)
    WHERE status = 'PENDING' AND in_backoff;

-- The batch collector's own: the due batch-tier items of a kind, store by store.
CREATE INDEX idx_job_items_batch_pending
    ON job_items (kind, instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND tier = 'batch';

-- The items a batch still holds (its outcome, a cancel's "is any still wanted").
CREATE INDEX idx_job_items_in_batch ON job_items (openai_batch_id)
    WHERE status = 'PROCESSING' AND openai_batch_id IS NOT NULL;

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

-- An item's tier from its job's (NULL: the kind's default, as its workers registered it), the
-- kind and the item's priority. 'auto' is 'batch' for a kind that can batch and a priority at
-- or under the fleet's AUTO_BATCH_MAX_PRIORITY; the size half of the rule (AUTO_BATCH_MIN_ITEMS)
-- needs the job's item count, which only the producer knows (it writes the tier itself). A kind
-- no worker has registered yet takes 'realtime' for 'auto' (nothing says it can batch).
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

-- Producers need not know about priorities, kinds nor tiers: an item takes its job's unless it
-- says otherwise.
CREATE FUNCTION job_items_fill_priority() RETURNS trigger
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

CREATE TRIGGER job_items_fill_priority
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.priority IS NULL OR NEW.kind IS NULL OR NEW.tier IS NULL)
    EXECUTE FUNCTION job_items_fill_priority();

-- An item inserted to be done later waits like a retry: in backoff from the start. The WHEN
-- clause is evaluated without a function call, so a producer's insert of due items pays
-- nothing more. Updates set the flag themselves (finish_items): a BEFORE UPDATE trigger, WHEN
-- or not, makes PostgreSQL fetch and lock each row's old version again, on every claim and
-- completion (+8 % on a completion's UPDATE here, +4.5 % of its WAL).
CREATE FUNCTION job_items_mark_backoff() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.in_backoff := true;
    RETURN NEW;
END;
$$;

CREATE TRIGGER job_items_mark_backoff
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.status = 'PENDING' AND NEW.run_after > now() AND NOT NEW.in_backoff)
    EXECUTE FUNCTION job_items_mark_backoff();

-- The stores whose due work was announced (NOTIFY job_items_ready) and that no claimer has
-- found drained since: an insert for a store already here sends no notification. A commit that
-- notifies takes one database-wide lock and holds it through its WAL flush, so notifying
-- commits cannot share a flush; a busy store's producers now commit without it. One row per
-- store and kind (a process that serves some kinds only claims, and retires, those).
CREATE TABLE announced_stores (
    instance_id text NOT NULL,
    kind text NOT NULL,
    announced_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, kind)
);

-- The advisory lock (class 1730027, this slot) that orders a producer's look at
-- `announced_stores` against a claimer's retirement of the store: producers hold it shared to
-- their commit, a retirement tries it exclusive (listener_retire_announced). 256 slots: a
-- statement inserting for thousands of stores takes 256 locks at most, not one per store.
CREATE FUNCTION listener_announce_slot(instance_id text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN hashtext(instance_id) & 255;

-- One notification per distinct store per statement, and only for a store not yet announced:
-- a 10,000-item insert is one NOTIFY, and so are a busy store's thousand one-item jobs until a
-- claimer finds it drained. Only items due now count: a retry waiting out its backoff is
-- announced when the promote step takes it out of backoff (an UPDATE like any other), at its
-- due time, not when it was written; batch-tier items are never announced (the batch path
-- collects them). The payload is the store id for today's kind, and '<store>\x1f<kind>' for the others: a
-- process that serves some kinds only wakes for those. Each store's slot lock (shared) is taken
-- before its row is looked at, in an earlier statement, and held to commit: a retirement cannot
-- judge the store until this commit is visible, and one that committed first has its delete
-- seen by the look.
CREATE FUNCTION job_items_notify_ready() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    ready record;
    sent bigint;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM pg_advisory_xact_lock_shared(1730027, listener_announce_slot(s.instance_id))
        FROM (
            SELECT DISTINCT instance_id FROM ready_items
            WHERE status = 'PENDING' AND run_after <= now() AND tier <> 'batch'
              AND instance_id IS NOT NULL
        ) s;
        -- No item of the statement is ready (a claim's, a completion's, a lease renewal's
        -- UPDATE): nothing to announce, and no second pass over its rows.
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        -- A later statement, a later snapshot: it sees every retirement that committed before
        -- the locks were granted. The common case ends here (every store announced already):
        -- a probe costs a fraction of the INSERT … ON CONFLICT below (bench.notify_trigger_floor).
        IF NOT EXISTS (
            SELECT 1 FROM ready_items r
            WHERE r.status = 'PENDING' AND r.run_after <= now() AND r.tier <> 'batch'
              AND r.instance_id IS NOT NULL
              AND NOT EXISTS (
                  SELECT 1 FROM announced_stores a
                  WHERE a.instance_id = r.instance_id AND a.kind = r.kind
              )
        ) THEN
            RETURN NULL;
        END IF;
        WITH announced AS (
            INSERT INTO announced_stores (instance_id, kind)
            SELECT DISTINCT instance_id, kind FROM ready_items
            WHERE status = 'PENDING' AND run_after <= now() AND tier <> 'batch'
              AND instance_id IS NOT NULL
            ON CONFLICT DO NOTHING
            RETURNING instance_id, kind
        )
        SELECT count(pg_notify('job_items_ready', CASE WHEN a.kind = 'product_description'
            THEN a.instance_id ELSE a.instance_id || E'\x1f' || a.kind END)::text)
        INTO sent FROM announced a;
        RETURN NULL;
    END IF;
    -- (A NULL store, possible only where an operator dropped the NOT NULL, is announced by
    -- nobody: `listener doctor` reports such items.)
    -- REPEATABLE READ or SERIALIZABLE: ON CONFLICT DO NOTHING refuses a conflicting row its
    -- snapshot cannot see (announced since it began) with a serialization failure, which here
    -- only means "announced already". One store at a time, so one refusal undoes no other.
    FOR ready IN
        SELECT DISTINCT instance_id, kind FROM ready_items
        WHERE status = 'PENDING' AND run_after <= now() AND tier <> 'batch'
          AND instance_id IS NOT NULL
    LOOP
        PERFORM pg_advisory_xact_lock_shared(1730027, listener_announce_slot(ready.instance_id));
        BEGIN
            INSERT INTO announced_stores (instance_id, kind)
            VALUES (ready.instance_id, ready.kind)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                PERFORM pg_notify('job_items_ready', CASE WHEN ready.kind = 'product_description'
                    THEN ready.instance_id ELSE ready.instance_id || E'\x1f' || ready.kind END);
            END IF;
        EXCEPTION WHEN serialization_failure THEN
            NULL;
        END;
    END LOOP;
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

-- A claimer found these stores drained of due items of `kinds` (its claim came back short):
-- their rows go, so the next insert for each is announced again. Why it cannot lose one: a
-- producer that saw a row (and so sent nothing) holds its slot's shared lock until it commits;
-- the exclusive lock is only tried, never waited for (a retirement must not stall producers),
-- and once held, a later statement (a new snapshot) sees every such producer's items. A producer
-- that comes after waits for this commit and then finds no row. Answers each store's fate:
-- 'retired' (no row left), 'pending' (due items after all: claim it again), 'busy' (a producer of
-- its slot is committing: look again in a moment).
CREATE FUNCTION listener_retire_announced(stores text[], kinds text[])
    RETURNS TABLE (instance_id text, outcome text)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    locked text[];
BEGIN
    SELECT coalesce(array_agg(s.store ORDER BY s.store), '{}') INTO locked
    FROM (SELECT DISTINCT unnest(stores) AS store) s
    WHERE pg_try_advisory_xact_lock(1730027, listener_announce_slot(s.store));
    RETURN QUERY
    WITH judged AS MATERIALIZED (
        SELECT l.store, EXISTS (
            SELECT 1 FROM job_items j
            WHERE j.instance_id = l.store AND j.status = 'PENDING' AND j.run_after <= now()
              AND NOT j.in_backoff AND j.tier <> 'batch' AND j.kind = ANY (kinds)
        ) AS pending
        FROM unnest(locked) AS l(store)
    ),
    gone AS (
        DELETE FROM announced_stores a
        WHERE a.instance_id IN (SELECT store FROM judged WHERE NOT pending)
          AND a.kind = ANY (kinds)
        RETURNING a.instance_id
    )
    SELECT s.store, CASE
            WHEN j.store IS NULL THEN 'busy'
            WHEN j.pending THEN 'pending'
            ELSE 'retired' END
    FROM (SELECT DISTINCT unnest(stores) AS store) s
    LEFT JOIN judged j ON j.store = s.store
    WHERE (SELECT count(*) FROM gone) >= 0;
END;
$$;

-- The job lifecycle.

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

-- End the jobs among `job_ids` that have no open item left: CANCELLED stays CANCELLED, a job
-- with a FAILED item is COMPLETED_WITH_ERRORS, the others COMPLETED. Returns the ids it ended.
CREATE FUNCTION listener_end_finished_jobs(job_ids bigint[]) RETURNS SETOF bigint
    LANGUAGE plpgsql AS $$
BEGIN
    -- Only the job row as it was looked at is closed (its xmin): a retry that reopened the job
    -- while this statement waited for its lock committed a new row version, and the stale look
    -- (no open item) must not close it.
    RETURN QUERY
    WITH done AS (
        SELECT j.id, j.xmin AS seen
        FROM jobs j
        WHERE j.id = ANY(job_ids)
          AND j.completed_at IS NULL
          AND NOT EXISTS (
              SELECT 1 FROM job_items open_item
              WHERE open_item.job_id = j.id AND open_item.status IN ('PENDING', 'PROCESSING')
          )
    )
    UPDATE jobs j
    SET status = CASE
            WHEN j.status = 'CANCELLED' THEN 'CANCELLED'
            WHEN EXISTS (SELECT 1 FROM job_items f WHERE f.job_id = j.id AND f.status = 'FAILED')
                THEN 'COMPLETED_WITH_ERRORS'
            ELSE 'COMPLETED'
        END,
        completed_at = now(),
        updated_at = now()
    FROM done
    WHERE j.id = done.id AND j.xmin = done.seen
    RETURNING j.id;
END;
$$;

-- Cancel a job: its PENDING items become CANCELLED at once; items in flight finish and keep
-- their result, and none goes back to PENDING (a retry or a release of one becomes CANCELLED);
-- items waiting in an OpenAI batch are CANCELLED at once too (their late lines are ignored);
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

-- The operator's policy per store. No row: weight 1, no caps, not paused; producers never
-- write here. Weights act in each process's ring; caps and pause are held by the claim itself.
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
    CONSTRAINT stores_max_in_flight_positive CHECK (max_in_flight > 0),
    -- Defaults for every job of the store (brand voice, language), under each job's own.
    options jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT stores_options_object CHECK (jsonb_typeof(options) = 'object')
);

-- A store's rpm_limit as a GCRA "theoretical arrival time", kept apart from `stores` so that
-- the claim's writes never look like an operator's change (no stores_changed notification).
CREATE TABLE store_throttles (
    instance_id text PRIMARY KEY REFERENCES stores (instance_id) ON DELETE CASCADE,
    rpm_tat timestamptz NOT NULL
);

-- Every process re-reads a changed store's row within milliseconds (and at each sweep).
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

-- How many of `wanted` items the claim may start now for a store with caps or a pause; the
-- claim calls it only for such stores, in store order (so two claims never deadlock).
-- The row lock serialises the claims of one capped store across every process, and each query
-- here takes a fresh snapshot (VOLATILE, READ COMMITTED): the count of PROCESSING items
-- includes what a claim that held the lock a moment ago committed.
-- rpm_limit: GCRA with a step of (60 s + tolerance) / rpm_limit, forgiving up to `tolerance`
-- of lateness. Any rpm_limit + 1 consecutive starts then span at least 60 s (no sliding 60 s
-- window ever holds more than rpm_limit), while a store served a little late (waiting for a
-- budget slot) still gets rpm_limit x 60 / (60 + tolerance) a minute, not less each time.
-- retry_in: seconds until the rpm cap allows the next item, when it held some back (NULL: only
-- a notification frees the store: resume, or room under max_in_flight).
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

-- The kinds the fleet's workers serve, registered by each worker at start: what a producer may
-- enqueue (an unknown kind or an undeclared option is refused), and what `doctor` compares with
-- the kinds of open jobs.
CREATE TABLE job_kinds (
    name text PRIMARY KEY,
    -- The options a job of this kind may carry (NULL: any), and those it must have.
    options text[],
    required_options text[] NOT NULL DEFAULT '{}',
    -- The limiter row its requests draw from; NULL: none (a kind that calls no metered API).
    budget text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_kinds_name_valid CHECK (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    -- Its default tier, whether its handler can batch, and the fleet's `auto` rule
    -- (AUTO_BATCH_MIN_ITEMS, AUTO_BATCH_MAX_PRIORITY), as its latest worker registered them:
    -- the producer and the fill trigger resolve tiers from here.
    tier text NOT NULL DEFAULT 'realtime',
    batchable boolean NOT NULL DEFAULT false,
    auto_batch_min_items integer,
    auto_batch_max_priority integer,
    CONSTRAINT job_kinds_tier_valid CHECK (tier IN ('realtime', 'batch', 'flex', 'auto'))
);

-- The dashboard's sessions across processes: the key that signs them when there is no API_TOKEN
-- (one for the fleet, so a session and its CSRF token hold behind a load balancer), and the
-- sessions ended by a sign-out (refused by every process until their cookie expires anyway).
CREATE TABLE dashboard_keys (
    name text PRIMARY KEY,
    key bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dashboard_keys_key_length CHECK (octet_length(key) >= 32)
);

CREATE TABLE dashboard_revoked_sessions (
    nonce text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

-- What each store costs: a trigger copies each completion's tokens into a per-store ledger, and
-- a compactor folds it into one row per store, day (UTC), model and tier; reports read these
-- two small tables, never job_items, and survive retention deleting the jobs.
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
