-- The benchmarks' own SQL: loading backlogs and reading what happened.

-- add_backlog --
-- One job per store and its items in one statement (one transaction, one notification per
-- store), as a client submits them. A store's items get consecutive ids.
WITH wanted AS (
    SELECT * FROM unnest(%(stores)s::text[], %(counts)s::int[]) AS w(instance_id, items)
), new_jobs AS (
    INSERT INTO jobs (instance_id)
    SELECT instance_id FROM wanted
    RETURNING id, instance_id
)
INSERT INTO job_items (job_id, instance_id, product_id, payload)
SELECT j.id, j.instance_id, 'p' || n,
       jsonb_build_object('name', 'Product ' || n || ' of ' || j.instance_id, 'price', n)
FROM new_jobs j
JOIN wanted w USING (instance_id)
CROSS JOIN LATERAL generate_series(1, w.items) AS n
ORDER BY j.id, n;

-- drop_pending --
-- Take a store's remaining PENDING items away (the trial is over; it must not stay active).
DELETE FROM job_items WHERE instance_id = ANY(%(stores)s::text[]) AND status = 'PENDING';

-- first_claimed --
-- When each store's first item was claimed, on the database's clock (Unix seconds).
SELECT instance_id, extract(epoch FROM min(claimed_at))::float8
FROM job_items
WHERE instance_id = ANY(%(stores)s::text[]) AND claimed_at IS NOT NULL
GROUP BY instance_id;

-- pending_ahead --
-- PENDING items a FIFO claim takes before this store's first item.
SELECT count(*)
FROM job_items
WHERE status = 'PENDING'
  AND id < (SELECT min(id) FROM job_items WHERE instance_id = %(store)s);

-- completions --
-- Every finished item: its store and when it was claimed and completed (Unix seconds).
SELECT instance_id,
       extract(epoch FROM claimed_at)::float8,
       extract(epoch FROM completed_at)::float8
FROM job_items
WHERE status = 'COMPLETED'
ORDER BY completed_at;

-- status_counts --
SELECT status, count(*) FROM job_items GROUP BY status;

-- connections --
-- The worker processes' connections to this database (pools and LISTEN sessions).
SELECT count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'listener%%';

-- ready_pids --
SELECT pid FROM worker_heartbeats;

-- store_summary --
-- Per store: its first item's claim, its last item's completion (Unix seconds), items done.
SELECT instance_id,
       extract(epoch FROM min(claimed_at))::float8,
       extract(epoch FROM max(completed_at))::float8,
       count(*) FILTER (WHERE status = 'COMPLETED')
FROM job_items
GROUP BY instance_id;

-- claim_order --
-- The stores of the first %(n)s items claimed, in the order they were claimed.
SELECT instance_id FROM job_items WHERE claimed_at IS NOT NULL ORDER BY claimed_at, id LIMIT %(n)s;
