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
-- Open items only: index range scans of the status index, cheap whatever the history.
SELECT
    (SELECT count(*) FROM job_items WHERE status = 'PENDING') AS pending,
    (SELECT count(*) FROM job_items WHERE status = 'PENDING' AND run_after <= now()) AS ready,
    (SELECT count(*) FROM job_items WHERE status = 'PROCESSING') AS processing;

-- limiter_totals --
-- The shared limiter's fleet-wide 429 count, and its pause while one is in force.
SELECT rate_limited_total,
    CASE WHEN paused_until > clock_timestamp() THEN paused_until END AS paused_until
FROM rate_limiters
WHERE name = %(name)s;
