-- Queries of the claimer, the workers' completions, the leases and the reaper.

-- claim --
-- One statement for every store of this turn: each LATERAL reads the head of one store's
-- range of idx_job_items_pending (priority first, then due time, then id), so the cost is
-- (stores x limit), never the backlog nor the items waiting out a backoff: those are out of
-- the index (in_backoff) until promote_due (sql/backoff.sql) puts them back when due, however
-- high their priority. A store with caps or a pause in `stores` gets what
-- listener_claim_allowance grants (stores arrive sorted, so two claims lock their rows in one
-- order); a store without a row costs one primary-key probe.
-- Its commit does not wait for the WAL flush (synchronous_commit off for this transaction
-- alone): a claim lost in a crash only means its lease never existed and the item is PENDING
-- again, which is what a crash does to it anyway. Outcomes keep the flush.
-- A claim takes the kinds of one budget's lane only (`kinds`): a store's items of other kinds
-- are read past (the index does not hold the kind), which costs nothing while a store's
-- pending items are of the lane's kinds, as they are when every process serves every kind.
WITH unflushed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), allowance AS MATERIALIZED (
    SELECT req.instance_id, req.quota, coalesce(a.granted, req.quota) AS granted, a.retry_in
    FROM unflushed, unnest(%(stores)s::text[], %(limits)s::int[]) AS req(instance_id, quota)
    LEFT JOIN LATERAL (
        SELECT g.granted, g.retry_in
        FROM stores s
        CROSS JOIN LATERAL listener_claim_allowance(s.instance_id, req.quota) AS g
        WHERE s.instance_id = req.instance_id
          AND (s.paused OR s.rpm_limit IS NOT NULL OR s.max_in_flight IS NOT NULL)
    ) AS a ON true
),
picked AS (
    SELECT item.id
    FROM allowance
    CROSS JOIN LATERAL (
        SELECT j.id
        FROM job_items j
        WHERE j.instance_id = allowance.instance_id
          AND j.status = 'PENDING'
          AND NOT j.in_backoff
          AND j.run_after <= now()
          AND j.tier <> 'batch'
          AND j.kind = ANY (%(kinds)s::text[])
        ORDER BY j.priority DESC, j.run_after, j.id
        LIMIT allowance.granted
        FOR UPDATE SKIP LOCKED
    ) AS item
),
claimed AS (
    UPDATE job_items j
    SET status = 'PROCESSING',
        claimed_at = now(),
        claimed_by = %(worker_id)s,
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
        attempts = j.attempts + 1,
        updated_at = now()
    -- An array, not a join with `picked`: the planner cannot tell how many rows the LATERALs
    -- yield, and for many stores it guessed high enough to hash-join a scan of the whole table.
    WHERE j.id = ANY (ARRAY(SELECT id FROM picked))
    -- The payload as text, parsed item by item in the worker: one that Python cannot read
    -- (nested past its recursion limit) fails that item alone, not the whole claim. One over the
    -- size limit is not sent at all, only its size, and fails with it.
    RETURNING j.id, j.job_id, j.instance_id, j.product_id,
        CASE WHEN octet_length(j.payload::text) <= %(max_payload_bytes)s
            THEN j.payload::text END AS payload_text,
        octet_length(j.payload::text) AS payload_bytes,
        j.attempts, j.kind, j.tier, j.deferred_since
),
options AS MATERIALIZED (
    -- Each claimed job's options over its store's defaults: a probe of `jobs` and of `stores`
    -- per job of the claim, not per item (scalar subqueries: index probes whatever the
    -- tables' sizes, never a join that reads them).
    SELECT c.job_id,
        coalesce(
            (SELECT s.options FROM stores s WHERE s.instance_id = c.instance_id), '{}'::jsonb
        ) || (SELECT job.options FROM jobs job WHERE job.id = c.job_id) AS options
    FROM (SELECT DISTINCT job_id, instance_id FROM claimed) AS c
),
announced AS MATERIALIZED (
    -- Under a budget (claims of an item or two), the fleet's other processes move the stores
    -- served here on in their own rings: their turns stay in step, one round for the fleet.
    SELECT pg_notify(
        'stores_served',
        concat_ws(E'\x1f', %(worker_id)s, instance_id, count(*)::text, %(lane)s::text)
    )
    FROM claimed
    WHERE %(announce)s
    GROUP BY instance_id
)
SELECT c.id, c.job_id, c.instance_id, c.product_id, c.payload_text, c.payload_bytes,
    c.attempts, NULL::float8 AS retry_in, c.kind, o.options::text AS options, c.tier,
    c.deferred_since
FROM claimed c
LEFT JOIN options o ON o.job_id = c.job_id
WHERE (SELECT count(*) FROM announced) >= 0
UNION ALL
-- One row per store its policy held back (paused, at max_in_flight, over rpm_limit): the
-- claimer takes it out of the ring until it is due (retry_in seconds) or notified.
SELECT NULL, NULL, instance_id, NULL, NULL, NULL, NULL, retry_in, NULL, NULL, NULL, NULL
FROM allowance
WHERE granted < quota;

-- announce_served --
-- `stores_served` for a claim that wrote outcomes, sent after its commit in a transaction that
-- writes nothing (no commit record, no WAL flush): NOTIFY's database-wide lock, taken at commit,
-- would otherwise be held through the outcomes' flush, and every other notifying commit of the
-- database (new stores announced, other processes' claims) would queue behind it.
SELECT count(pg_notify('stores_served', concat_ws(
    E'\x1f', %(worker_id)s::text, s.instance_id, s.items::text, %(lane)s::text
))::text)
FROM unnest(%(stores)s::text[], %(counts)s::int[]) AS s(instance_id, items);

-- flush_at_commit --
-- The last statement of a claim that also writes outcomes: the claim turned the WAL flush off
-- for its transaction, and outcomes must not be lost in a crash once the worker moved on.
SET LOCAL synchronous_commit = on;

-- store_next_items --
-- The single-store form of the claim's lookup, for EXPLAIN in tests and in the runbook.
SELECT id FROM job_items
WHERE instance_id = %(instance_id)s AND status = 'PENDING' AND NOT in_backoff
  AND run_after <= now() AND tier <> 'batch'
ORDER BY priority DESC, run_after, id
LIMIT %(quota)s;

-- ready_stores --
-- Each store with PENDING real-time (and flex) items out of backoff and the seconds until its
-- first is due (0: due now; later only for items an operator's UPDATE dated later without the
-- flag), by a loose index scan: one probe per distinct (store, priority), so 10,000 stores over 1,000,000
-- pending rows cost about 10,000 probes, not a scan of the rows. Within a (store, priority)
-- range the index is in due order, so each range's head is its earliest item. Stores whose
-- items all wait out a backoff are not listed: promote_due announces them when one is due.
WITH RECURSIVE heads AS (
    (
        SELECT instance_id, priority, run_after FROM job_items
        WHERE status = 'PENDING' AND NOT in_backoff AND tier <> 'batch'
          AND kind = ANY (%(kinds)s::text[])
        ORDER BY instance_id, priority DESC, run_after, id
        LIMIT 1
    )
    UNION ALL
    SELECT following.instance_id, following.priority, following.run_after
    FROM heads
    CROSS JOIN LATERAL (
        (
            SELECT j.instance_id, j.priority, j.run_after FROM job_items j
            WHERE j.status = 'PENDING' AND NOT j.in_backoff AND j.tier <> 'batch'
              AND j.instance_id = heads.instance_id
              AND j.priority < heads.priority AND j.kind = ANY (%(kinds)s::text[])
            ORDER BY j.priority DESC, j.run_after, j.id
            LIMIT 1
        )
        UNION ALL
        (
            SELECT j.instance_id, j.priority, j.run_after FROM job_items j
            WHERE j.status = 'PENDING' AND NOT j.in_backoff AND j.tier <> 'batch'
              AND j.instance_id > heads.instance_id
              AND j.kind = ANY (%(kinds)s::text[])
            ORDER BY j.instance_id, j.priority DESC, j.run_after, j.id
            LIMIT 1
        )
        LIMIT 1
    ) AS following
)
SELECT instance_id,
    greatest(0, extract(epoch FROM min(run_after) - now()))::float8 AS due_in
FROM heads
GROUP BY instance_id;

-- lock_jobs_of_outcomes --
-- The first statement of an outcome batch's transaction: the batch's jobs, in id order. Two
-- completers writing the last items of one job queue here, so the second one's finish_jobs (a
-- later statement, a later snapshot) sees the first one's items finished and ends the job; a
-- cancel in progress (it holds the job row) is waited for and seen, so an item that would go
-- back to PENDING ends CANCELLED. NO KEY UPDATE: a producer's insert of more items of the job
-- (its foreign key takes KEY SHARE) is not blocked.
SELECT id FROM jobs
WHERE id = ANY(%(job_ids)s::bigint[])
ORDER BY id
FOR NO KEY UPDATE;

-- finish_items --
-- Write a batch of outcomes in one statement. An outcome only lands while this worker still
-- holds the item: one whose lease was reaped and re-claimed elsewhere is left alone. An item
-- that would go back to PENDING in a cancelled job ends CANCELLED instead: nothing of a job
-- starts after its cancel. Only outcomes whose job row this transaction holds (the completer:
-- lock_jobs_of_outcomes, waited for) or can take now are written; a job another transaction
-- holds (a store-wide cancel or retry, minutes long) is skipped, not waited for, and its
-- outcomes come back with a NULL status: a claim that carries them must not wait on a cancel,
-- so it leaves them to the completer, which writes them alone. The job's status is read from
-- the row as locked (its latest version, READ COMMITTED), not from this statement's snapshot:
-- a cancel that committed between the snapshot and the lock is seen.
-- The batch comes as one JSON array of objects, one per outcome (items.outcome_params): built
-- by Python's C encoder in one call, where seven arrays cost psycopg's per-element dumping:
-- a sixth of a worker's CPU at full speed (bench.profile_worker --cprofile). JSON null: NULL.
WITH requested AS MATERIALIZED (
    SELECT o.*
    FROM json_to_recordset(%(outcomes)s::json)
        AS o(id bigint, job_id bigint, status text, result jsonb, error text, delay float8,
             refund bool, attempt int, usage jsonb, model text, served_tier text, deferred bool)
),
-- The jobs come from the outcomes (their claim read them): the item's own job_id still decides
-- below (`outcome`), so an outcome that named another job is never written.
held AS MATERIALIZED (
    SELECT c.id, c.status
    FROM jobs c
    WHERE c.id IN (SELECT job_id FROM requested)
    ORDER BY c.id
    FOR NO KEY UPDATE SKIP LOCKED
),
outcome AS (
    -- Each outcome's item by its primary key: the job the item is really in decides.
    SELECT r.*, r.status = 'PENDING' AND held.status = 'CANCELLED' AS cancelled
    FROM requested r
    JOIN job_items i ON i.id = r.id
    JOIN held ON held.id = i.job_id
),
finished AS (
UPDATE job_items j
SET status = CASE WHEN outcome.cancelled THEN 'CANCELLED' ELSE outcome.status END,
    result = coalesce(outcome.result, j.result),
    error = outcome.error,
    completed_at = CASE WHEN outcome.status = 'PENDING' AND NOT outcome.cancelled
        THEN NULL ELSE now() END,
    -- A retry waits out its backoff, out of the claim's index (in_backoff) until promote_due
    -- puts it back when due; a release (delay 0) keeps its place in its store's line.
    run_after = CASE WHEN outcome.status = 'PENDING' AND outcome.delay > 0
        THEN now() + make_interval(secs => outcome.delay) ELSE j.run_after END,
    in_backoff = outcome.status = 'PENDING' AND NOT outcome.cancelled AND outcome.delay > 0,
    -- A release (shutdown, rate limit) gives the attempt back: the item was never really tried.
    attempts = CASE WHEN outcome.refund THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    -- What the call cost, for a completion: job_items_record_usage copies its tokens into the
    -- store's usage ledger in this statement. An outcome that carries none keeps what the item
    -- has (the Batch API's writer records it just before: batches.sql record_usage).
    usage = coalesce(outcome.usage, j.usage),
    model = coalesce(outcome.model, j.model),
    served_tier = coalesce(outcome.served_tier, j.served_tier),
    -- A deferral's clock starts at the claim of the first attempt deferred (flex: its first
    -- flex request), and runs on through later deferrals.
    deferred_since = CASE WHEN outcome.deferred THEN coalesce(j.deferred_since, j.claimed_at)
        ELSE j.deferred_since END,
    -- A finished item keeps the name of the worker that did it, for the operator.
    claimed_by = CASE WHEN outcome.status = 'PENDING' THEN NULL ELSE j.claimed_by END,
    lease_expires_at = NULL,
    updated_at = now()
FROM outcome
-- The claim's attempt number fences it too: a worker frozen past its lease (a stopped VM, a
-- long GC) that wakes up after its item was reaped and claimed again cannot overwrite it.
WHERE j.id = outcome.id AND j.status = 'PROCESSING' AND j.claimed_by = %(worker_id)s
  AND j.attempts = outcome.attempt
  -- The batch's rows by their ids too (an array, as in the claim): on statistics taken while
  -- the table was empty (a fresh or truncated table, until the statistics watch analyzes it),
  -- the planner otherwise took the PROCESSING rows first and scanned the whole batch for each
  -- (0.45 s for 500 outcomes in EXPLAIN ANALYZE; 0.15 s with this).
  AND j.id = ANY (ARRAY(SELECT id FROM requested))
RETURNING j.id, j.job_id, j.instance_id, j.status
),
room AS MATERIALIZED (
    -- A store held at its max_in_flight has room again: every process may look at it now.
    -- Driven from the batch's few stores (a primary-key probe each), not from `stores`.
    SELECT pg_notify('job_items_ready', s.instance_id)
    FROM (SELECT DISTINCT instance_id FROM finished) AS f
    JOIN stores s ON s.instance_id = f.instance_id
    WHERE s.max_in_flight IS NOT NULL
      AND EXISTS (
          SELECT 1 FROM job_items p
          WHERE p.instance_id = s.instance_id AND p.status = 'PENDING' AND NOT p.in_backoff
            AND p.run_after <= now() AND p.tier <> 'batch'
      )
)
SELECT id, job_id, status FROM finished
WHERE (SELECT count(*) FROM room) >= 0
UNION ALL
-- From the outcomes alone: a join with job_items here was planned as a scan of the whole table
-- (a few hundred estimated outcomes against its rows), 8 to 12 ms a batch at 20,000 rows.
SELECT r.id, r.job_id, NULL
FROM requested r
WHERE r.job_id NOT IN (SELECT id FROM held);

-- finish_held_jobs --
-- finish_jobs for a claim's outcomes: only the jobs this transaction holds or can take now (a
-- cancel's are skipped, like their outcomes in finish_items, and end with the cancel or with
-- the completer's write).
SELECT listener_end_finished_jobs(ARRAY(
    SELECT id FROM jobs
    WHERE id = ANY (%(job_ids)s::bigint[])
    ORDER BY id
    FOR NO KEY UPDATE SKIP LOCKED
));

-- finish_jobs --
-- After finish_items, in its transaction (which holds the jobs' rows: lock_jobs_of_outcomes),
-- or after the reaper's commit: a statement of its own sees every outcome committed before it.
-- A cancel in progress cannot slip between: it holds the job row, which the outcomes' transaction
-- waits for, so this statement then sees the cancel. The rule, and its guard against a job
-- reopened meanwhile, is listener_end_finished_jobs (sql/schema.sql).
SELECT listener_end_finished_jobs(%(job_ids)s::bigint[]);

-- close_stranded_jobs --
-- The reaper's sweep: jobs whose items are all finished but that were never closed (the reaper
-- was cut off between its commit and its finish_jobs, an operator's UPDATE finished the items).
-- Outcomes end their jobs in their own transaction, so such jobs are rare and the sweep is a
-- safety net: it need not find them at once, only surely. It used to judge every open job on
-- each pass, in every process: 0.7 s at 200,000 open jobs, each 10 s, times the processes.
-- Now one pass judges at most %(chunk)s open jobs, the next ones after %(after)s in id order
-- (a range of idx_jobs_open: a cost that does not grow with the open jobs), and the caller
-- walks on from the last id it returns, wrapping round at the end; %(after)s < 0 starts at a
-- random id, so the processes of a fleet walk different parts. Why not a cheaper signal: a
-- stranded job is one with no open item, which no index can list (idx_job_items_open_job
-- holds the open items, the complement), and "items changed since the last pass" would need an
-- index on job_items' update time, paid by every outcome's write. One process of the fleet at
-- a time: the advisory lock is tried, never waited for (a process that misses it skips the
-- pass, and its cursor stays); `locked` false says so. Each judged job goes through the same
-- rule as finish_jobs (listener_end_finished_jobs), and only one with items: a producer's job
-- whose items are not inserted yet stays open.
WITH locked AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(%(key)s) AS mine
),
start AS MATERIALIZED (
    SELECT CASE WHEN %(after)s::bigint >= 0 THEN %(after)s::bigint
        ELSE floor(random() * coalesce((SELECT max(id) FROM jobs), 0))::bigint END AS after
),
chunk AS MATERIALIZED (
    SELECT j.id
    FROM jobs j
    WHERE (SELECT mine FROM locked)
      AND j.completed_at IS NULL
      AND j.id > (SELECT after FROM start)
    ORDER BY j.id
    LIMIT %(chunk)s
),
closed AS MATERIALIZED (
    SELECT count(*) AS jobs FROM listener_end_finished_jobs(ARRAY(
        SELECT c.id FROM chunk c
        WHERE EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = c.id)
    ))
)
SELECT (SELECT mine FROM locked) AS locked,
    (SELECT jobs FROM closed) AS closed,
    (SELECT count(*) FROM chunk) AS judged,
    coalesce((SELECT max(id) FROM chunk), (SELECT after FROM start)) AS last_id;

-- extend_leases --
-- Unflushed like the claim: a renewal lost in a crash only shortens a lease. SKIP LOCKED: an
-- item locked now is having its outcome written, and needs no longer lease; waiting for it
-- while holding other items the outcome's statement wants would deadlock the two.
WITH unflushed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
)
UPDATE job_items
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE id IN (
    SELECT id FROM job_items
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'PROCESSING' AND claimed_by = %(worker_id)s
    FOR NO KEY UPDATE SKIP LOCKED
)
  AND EXISTS (SELECT FROM unflushed);

-- lock_jobs_of_expired --
-- The reaper's first statement (see lock_jobs_of_outcomes): the jobs of the items it may reap.
SELECT id FROM jobs
WHERE id IN (
    SELECT job_id FROM job_items
    WHERE status = 'PROCESSING' AND lease_expires_at < now()
    ORDER BY id
    LIMIT 1000
)
ORDER BY id
FOR SHARE;

-- reap_expired --
-- Items whose worker stopped renewing their lease (killed, frozen, cut off): back to PENDING
-- (the UPDATE trigger notifies every listener), or FAILED once they have used every attempt,
-- or CANCELLED when their job was cancelled. Only items of the jobs locked just before. An item
-- that ends (FAILED, CANCELLED) frees room under its store's max_in_flight, which no trigger
-- announces (only items back to PENDING are): `room` notifies like finish_items does, or a
-- store held at its cap would wait for the sweep.
WITH reaped AS (
UPDATE job_items j
SET status = CASE
        WHEN c.status = 'CANCELLED' THEN 'CANCELLED'
        WHEN j.attempts >= %(max_attempts)s THEN 'FAILED'
        ELSE 'PENDING' END,
    error = CASE WHEN j.attempts >= %(max_attempts)s AND c.status <> 'CANCELLED'
        THEN 'lease expired on each of ' || j.attempts || ' attempt(s): the item may crash its worker'
        ELSE j.error END,
    completed_at = CASE WHEN j.attempts >= %(max_attempts)s OR c.status = 'CANCELLED'
        THEN now() ELSE NULL END,
    -- Back in its place in its store's line (run_after was due when it was claimed).
    in_backoff = false,
    claimed_by = NULL,
    lease_expires_at = NULL,
    updated_at = now()
FROM jobs c
WHERE c.id = j.job_id
  AND j.id IN (
    SELECT id FROM job_items
    WHERE status = 'PROCESSING' AND lease_expires_at < now()
      AND job_id = ANY(%(job_ids)s::bigint[])
    ORDER BY id
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
)
RETURNING j.id, j.job_id, j.instance_id, j.status
),
room AS MATERIALIZED (
    SELECT pg_notify('job_items_ready', s.instance_id)
    FROM (SELECT DISTINCT instance_id FROM reaped WHERE status <> 'PENDING') AS r
    JOIN stores s ON s.instance_id = r.instance_id
    WHERE s.max_in_flight IS NOT NULL
      AND EXISTS (
          SELECT 1 FROM job_items p
          WHERE p.instance_id = s.instance_id AND p.status = 'PENDING' AND NOT p.in_backoff
            AND p.run_after <= now() AND p.tier <> 'batch'
      )
)
SELECT id, job_id, instance_id, status FROM reaped
WHERE (SELECT count(*) FROM room) >= 0;

-- count_pending --
SELECT count(*) FROM job_items WHERE status = 'PENDING';

-- retire_drained --
-- Stores a claim found drained of due items of the lane's kinds: out of `announced_stores`, so
-- the next insert for each notifies again (listener_retire_announced says why none is lost).
SELECT instance_id, outcome
FROM listener_retire_announced(%(stores)s::text[], %(kinds)s::text[]);

-- retire_stale --
-- The listener's, at each (re)connect and sweep, before its scan: rows nobody retired (a worker
-- stopped between a claim and its retirement, a worker older than announced_stores). Only rows
-- that look drained to this statement's snapshot are judged, under the slots' locks: a busy
-- store's row is not locked for nothing.
SELECT instance_id, outcome
FROM listener_retire_announced(ARRAY(
    SELECT DISTINCT a.instance_id FROM announced_stores a
    WHERE a.kind = ANY (%(kinds)s::text[])
      AND NOT EXISTS (
          SELECT 1 FROM job_items j
          WHERE j.instance_id = a.instance_id AND j.status = 'PENDING'
            AND j.run_after <= now() AND NOT j.in_backoff AND j.tier <> 'batch'
            AND j.kind = ANY (%(kinds)s::text[])
      )
), %(kinds)s::text[]);
