-- A store is announced once: `announced_stores` holds the stores whose due work was announced
-- (NOTIFY job_items_ready) and not yet found drained by a claimer, and the insert trigger
-- notifies only for stores it adds there, so a busy store's producers commit without the
-- database-wide notify lock (held through each notifying commit's WAL flush). Claimers retire
-- drained stores (listener_retire_announced); the listener's sweep clears rows nobody retired
-- (a worker stopped between a claim and its retirement, or one older than this migration).
-- up --
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
-- announced when the promote step takes it out of backoff, and batch-tier items never are (the
-- batch path collects them). The payload is the store id for today's kind, and '<store>\x1f<kind>' for the others: a
-- process that serves some kinds only wakes for those. Each store's slot lock (shared) is taken
-- before its row is looked at, in an earlier statement, and held to commit: a retirement cannot
-- judge the store until this commit is visible, and one that committed first has its delete
-- seen by the look.
CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger
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

-- down --
DROP FUNCTION listener_retire_announced(text[], text[]);

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

DROP FUNCTION listener_announce_slot(text);
DROP TABLE announced_stores;
