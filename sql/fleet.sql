-- The whole fleet's figures, read by any process (a worker's HTTP, `listener api`, the demo).

-- live_workers --
SELECT worker_id, hostname, pid, started_at, seen_at, listener_connected, stats
FROM worker_heartbeats
WHERE seen_at > now() - make_interval(secs => %(stale_seconds)s)
ORDER BY worker_id;

-- count_live_workers --
SELECT count(*) FROM worker_heartbeats
WHERE seen_at > now() - make_interval(secs => %(stale_seconds)s);

-- item_counts --
-- Bounded whatever the backlog: at most %(cap)s rows per figure (a LIMITed read), `ready` from
-- the same rows (PENDING and due now). A figure that reaches the cap is replaced by the
-- planner's estimate (the *_estimate blocks): a LIMITed sample is in physical or index order,
-- not random, so it cannot be scaled up.
WITH pending AS (
    SELECT run_after <= now() AS due FROM job_items WHERE status = 'PENDING' LIMIT %(cap)s
)
SELECT
    (SELECT count(*) FROM pending) AS pending,
    (SELECT count(*) FILTER (WHERE due) FROM pending) AS ready,
    (SELECT count(*) FROM
        (SELECT 1 FROM job_items WHERE status = 'PROCESSING' LIMIT %(cap)s) p) AS processing;

-- pending_estimate --
-- The planner's row estimate (pg_class.reltuples and the status column's statistics, kept by
-- autovacuum): no row is read.
EXPLAIN (FORMAT JSON) SELECT 1 FROM job_items WHERE status = 'PENDING';

-- ready_estimate --
EXPLAIN (FORMAT JSON) SELECT 1 FROM job_items WHERE status = 'PENDING' AND run_after <= now();

-- processing_estimate --
EXPLAIN (FORMAT JSON) SELECT 1 FROM job_items WHERE status = 'PROCESSING';

-- limiter_totals --
-- The shared limiter's fleet-wide 429 count, and its pause while one is in force.
SELECT rate_limited_total,
    CASE WHEN paused_until > clock_timestamp() THEN paused_until END AS paused_until
FROM rate_limiters
WHERE name = %(name)s;
