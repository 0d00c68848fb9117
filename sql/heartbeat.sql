-- Each worker process's heartbeat row: liveness and the counters behind the fleet's figures.

-- upsert_heartbeat --
-- Its commit does not wait for the WAL flush: a beat lost in a crash is replaced by the next.
-- Returns how many other workers beat within `stale_seconds`: a process alone under a budget
-- has nobody to tell which stores it served (`stores_served`).
WITH unflushed AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
)
INSERT INTO worker_heartbeats (worker_id, hostname, pid, listener_connected, stats)
SELECT %(worker_id)s, %(hostname)s, %(pid)s, %(listener_connected)s, %(stats)s::jsonb
FROM unflushed
ON CONFLICT (worker_id) DO UPDATE
SET seen_at = now(),
    listener_connected = EXCLUDED.listener_connected,
    stats = EXCLUDED.stats
RETURNING (
    SELECT count(*) FROM worker_heartbeats other
    WHERE other.worker_id <> %(worker_id)s
      AND other.seen_at > now() - make_interval(secs => %(stale_seconds)s)
) AS others;

-- delete_heartbeat --
DELETE FROM worker_heartbeats WHERE worker_id = %(worker_id)s;

-- forget_dead_workers --
-- A worker killed without a goodbye stops beating; after ten minutes its row is history.
DELETE FROM worker_heartbeats WHERE seen_at < now() - interval '10 minutes';
