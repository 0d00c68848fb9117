-- The worker processes' heartbeat rows: liveness and counters for the fleet-wide figures.

-- upsert_heartbeat --
INSERT INTO worker_heartbeats (worker_id, hostname, pid, listener_connected, stats)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(listener_connected)s, %(stats)s::jsonb)
ON CONFLICT (worker_id) DO UPDATE
SET seen_at = now(),
    listener_connected = EXCLUDED.listener_connected,
    stats = EXCLUDED.stats;

-- delete_heartbeat --
DELETE FROM worker_heartbeats WHERE worker_id = %(worker_id)s;

-- forget_dead_workers --
-- A worker killed without a goodbye stops beating; after ten minutes its row is history.
DELETE FROM worker_heartbeats WHERE seen_at < now() - interval '10 minutes';

-- live_workers --
SELECT worker_id, hostname, pid, started_at, seen_at, listener_connected, stats
FROM worker_heartbeats
WHERE seen_at > now() - make_interval(secs => %(stale_seconds)s)
ORDER BY worker_id;

-- item_counts --
-- Open items only: index range scans of the status index, cheap whatever the history.
SELECT
    (SELECT count(*) FROM job_items WHERE status = 'PENDING') AS pending,
    (SELECT count(*) FROM job_items WHERE status = 'PENDING' AND run_after <= now()) AS ready,
    (SELECT count(*) FROM job_items WHERE status = 'PROCESSING') AS processing;

-- count_live_workers --
SELECT count(*) FROM worker_heartbeats
WHERE seen_at > now() - make_interval(secs => %(stale_seconds)s);

-- limiter_totals --
-- The shared limiter's fleet-wide 429 count, and its pause while one is in force.
SELECT rate_limited_total,
    CASE WHEN paused_until > clock_timestamp() THEN paused_until END AS paused_until
FROM rate_limiters
WHERE name = %(name)s;

-- schema_ready --
-- Has `listener migrate up` run here? The worker checks before it starts.
SELECT to_regclass('job_items') IS NOT NULL;
