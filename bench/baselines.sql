-- The two claims the project's claim (sql/items.sql, block `claim`) is measured against.
-- Both take the same parameters as far as they apply and change the rows exactly as the
-- project's claim does, so the three statements do the same work per item.

-- fifo --
-- The old worker's claim: the oldest PENDING items, whatever their store. Cheap, but one
-- store's backlog at the head of the table starves every other store.
WITH picked AS (
    SELECT id
    FROM job_items
    WHERE status = 'PENDING'
    ORDER BY id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE job_items j
SET status = 'PROCESSING',
    claimed_at = now(),
    claimed_by = %(worker_id)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    attempts = j.attempts + 1,
    updated_at = now()
FROM picked
WHERE j.id = picked.id
-- The same columns as the project's claim, computed the same way.
RETURNING j.id, j.job_id, j.instance_id, j.product_id,
    CASE WHEN octet_length(j.payload::text) <= %(max_payload_bytes)s THEN j.payload::text END,
    octet_length(j.payload::text),
    j.attempts;

-- naive_fair --
-- Fair by construction (round robin: every store's first item, then every store's second, …,
-- at most %(per_store)s per store), but it ranks every PENDING row on every claim.
WITH ranked AS (
    SELECT id, row_number() OVER (PARTITION BY instance_id ORDER BY id) AS rank
    FROM job_items
    WHERE status = 'PENDING'
), picked AS (
    SELECT j.id
    FROM job_items j
    WHERE j.id IN (
        SELECT id FROM ranked WHERE rank <= %(per_store)s ORDER BY rank, id LIMIT %(batch)s
    )
      AND j.status = 'PENDING'
    FOR UPDATE SKIP LOCKED
)
UPDATE job_items j
SET status = 'PROCESSING',
    claimed_at = now(),
    claimed_by = %(worker_id)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    attempts = j.attempts + 1,
    updated_at = now()
FROM picked
WHERE j.id = picked.id
-- The same columns as the project's claim, computed the same way.
RETURNING j.id, j.job_id, j.instance_id, j.product_id,
    CASE WHEN octet_length(j.payload::text) <= %(max_payload_bytes)s THEN j.payload::text END,
    octet_length(j.payload::text),
    j.attempts;

-- item_counts_exact --
-- The stats' counts before issue 11 (defect 6): every open item read at each request.
SELECT
    (SELECT count(*) FROM job_items WHERE status = 'PENDING') AS pending,
    (SELECT count(*) FROM job_items WHERE status = 'PENDING' AND run_after <= now()) AS ready,
    (SELECT count(*) FROM job_items WHERE status = 'PROCESSING') AS processing;

-- close_stranded_jobs_before --
-- The reaper's sweep before issue 25 (defect 6): every open job with items judged on each
-- pass, in every process, with no lock (bench.stranded_jobs).
SELECT count(*) FROM listener_end_finished_jobs(ARRAY(
    SELECT j.id FROM jobs j
    WHERE j.completed_at IS NULL
      AND EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id)
));
