-- Queries of the claimer, the workers' completions, the leases and the reaper.

-- claim --
-- One statement for every store of this turn: each LATERAL reads the head of one store's
-- range of idx_job_items_pending, so the cost is (stores x limit), never the backlog.
-- Its commit does not wait for the WAL flush (synchronous_commit off for this transaction
-- alone): a claim lost in a crash only means its lease never existed and the item is PENDING
-- again, which is what a crash does to it anyway. Outcomes keep the flush.
WITH unflushed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), picked AS (
    SELECT item.id
    FROM unflushed,
        unnest(%(stores)s::text[], %(limits)s::int[]) AS store(instance_id, quota)
    CROSS JOIN LATERAL (
        SELECT j.id
        FROM job_items j
        WHERE j.instance_id = store.instance_id
          AND j.status = 'PENDING'
          AND j.run_after <= now()
        ORDER BY j.id
        LIMIT store.quota
        FOR UPDATE SKIP LOCKED
    ) AS item
)
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
-- The payload as text, parsed item by item in the worker: one that Python cannot read (nested
-- past its recursion limit) fails that item alone, not the whole claim. One over the size
-- limit is not sent at all, only its size, and fails with it.
RETURNING j.id, j.job_id, j.instance_id, j.product_id,
    CASE WHEN octet_length(j.payload::text) <= %(max_payload_bytes)s THEN j.payload::text END,
    octet_length(j.payload::text),
    j.attempts;

-- store_next_items --
-- The single-store form of the claim's lookup, for EXPLAIN in tests and in the runbook.
SELECT id FROM job_items
WHERE instance_id = %(instance_id)s AND status = 'PENDING' AND run_after <= now()
ORDER BY id
LIMIT %(quota)s;

-- ready_stores --
-- A loose index scan: one index probe per distinct store with PENDING items, so 10,000 stores
-- over 1,000,000 pending rows cost 10,000 probes, not a scan of the rows.
WITH RECURSIVE stores AS (
    (SELECT instance_id FROM job_items WHERE status = 'PENDING' ORDER BY instance_id LIMIT 1)
    UNION ALL
    SELECT (
        SELECT j.instance_id FROM job_items j
        WHERE j.status = 'PENDING' AND j.instance_id > stores.instance_id
        ORDER BY j.instance_id LIMIT 1
    )
    FROM stores
    WHERE stores.instance_id IS NOT NULL
)
SELECT instance_id FROM stores WHERE instance_id IS NOT NULL;

-- lock_jobs_of_items --
-- Before outcomes that return items to PENDING: the jobs' rows, in id order, so a cancel in
-- progress is waited for and the next statement sees it (then those items end CANCELLED).
SELECT id FROM jobs
WHERE id IN (SELECT job_id FROM job_items WHERE id = ANY(%(ids)s::bigint[]))
ORDER BY id
FOR SHARE;

-- finish_items --
-- Write a batch of outcomes in one statement. An outcome only lands while this worker still
-- holds the item: one whose lease was reaped and re-claimed elsewhere is left alone. An item
-- that would go back to PENDING in a cancelled job ends CANCELLED instead: nothing of a job
-- starts after its cancel.
WITH outcome AS (
    SELECT o.*,
        CASE WHEN o.status = 'PENDING' THEN EXISTS (
            SELECT 1 FROM job_items i JOIN jobs c ON c.id = i.job_id
            WHERE i.id = o.id AND c.status = 'CANCELLED'
        ) ELSE false END AS cancelled
    FROM unnest(
        %(ids)s::bigint[], %(statuses)s::text[], %(results)s::jsonb[], %(errors)s::text[],
        %(delays)s::float8[], %(refunds)s::bool[], %(attempts)s::int[]
    ) AS o(id, status, result, error, delay, refund, attempt)
)
UPDATE job_items j
SET status = CASE WHEN outcome.cancelled THEN 'CANCELLED' ELSE outcome.status END,
    result = coalesce(outcome.result, j.result),
    error = outcome.error,
    completed_at = CASE WHEN outcome.status = 'PENDING' AND NOT outcome.cancelled
        THEN NULL ELSE now() END,
    run_after = CASE WHEN outcome.status = 'PENDING'
        THEN now() + make_interval(secs => outcome.delay) ELSE j.run_after END,
    -- A release (shutdown, rate limit) gives the attempt back: the item was never really tried.
    attempts = CASE WHEN outcome.refund THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    -- A finished item keeps the name of the worker that did it, for the operator.
    claimed_by = CASE WHEN outcome.status = 'PENDING' THEN NULL ELSE j.claimed_by END,
    lease_expires_at = NULL,
    updated_at = now()
FROM outcome
-- The claim's attempt number fences it too: a worker frozen past its lease (a stopped VM, a
-- long GC) that wakes up after its item was reaped and claimed again cannot overwrite it.
WHERE j.id = outcome.id AND j.status = 'PROCESSING' AND j.claimed_by = %(worker_id)s
  AND j.attempts = outcome.attempt
RETURNING j.id, j.job_id, j.status;

-- finish_jobs --
-- Runs after finish_items has committed, so of two workers finishing a job's last items at
-- once, the later one always sees the other's commit. A cancel in progress cannot slip between:
-- it share-locks the job's PROCESSING items, so an outcome written after its look waits for its
-- commit, and this statement, which runs after that outcome, then sees the cancel.
-- Only the job row as it was looked at is closed (its xmin): a retry that reopened the job while
-- this statement waited for its lock committed a new row version, and the stale look (no open
-- item) must not close it.
WITH done AS (
    SELECT j.id, j.xmin AS seen
    FROM jobs j
    WHERE j.id = ANY(%(job_ids)s::bigint[])
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
WHERE j.id = done.id AND j.xmin = done.seen;

-- close_stranded_jobs --
-- The reaper's sweep: jobs whose items are all finished but that were never closed (the worker
-- that wrote their last outcome was cut off before its finish_jobs, or its look was stale).
-- The same rule and the same guard as finish_jobs.
WITH done AS (
    SELECT j.id, j.xmin AS seen
    FROM jobs j
    WHERE j.completed_at IS NULL  -- idx_jobs_open: the open jobs only
      AND EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id)
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
WHERE j.id = done.id AND j.xmin = done.seen;

-- extend_leases --
-- Unflushed like the claim: a renewal lost in a crash only shortens a lease.
WITH unflushed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
)
UPDATE job_items
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'PROCESSING' AND claimed_by = %(worker_id)s
  AND EXISTS (SELECT FROM unflushed);

-- lock_jobs_of_expired --
-- The reaper's first statement (see lock_jobs_of_items): the jobs of the items it may reap.
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
-- or CANCELLED when their job was cancelled. Only items of the jobs locked just before.
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
    run_after = now(),
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
RETURNING j.id, j.job_id, j.instance_id, j.status;

-- count_pending --
SELECT count(*) FROM job_items WHERE status = 'PENDING';
