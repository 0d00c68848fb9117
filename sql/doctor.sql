-- `listener doctor`: read-only questions about a deployment, each cheap at any backlog (1 M
-- pending over 10,000 stores answers in well under 2 s: see the README).

-- applied_migrations --
SELECT name FROM schema_migrations ORDER BY name;

-- has_tracking_table --
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- instance_id_column --
-- The column, whether it is NOT NULL, and the validated CHECK constraints that can stand in for
-- NOT NULL while a migration is half-way (the checklist's `\d job_items`).
SELECT a.attnotnull,
    coalesce(
        (SELECT array_agg(c.conname ORDER BY c.conname) FROM pg_constraint c
         WHERE c.conrelid = a.attrelid AND c.contype = 'c' AND c.convalidated
           AND pg_get_constraintdef(c.oid) ~* '\(?instance_id IS NOT NULL\)?'),
        '{}'
    ) AS not_null_checks
FROM pg_attribute a
WHERE a.attrelid = to_regclass('job_items') AND a.attname = 'instance_id' AND NOT a.attisdropped;

-- null_instance_ids --
SELECT count(*) FROM job_items WHERE instance_id IS NULL;

-- indexes --
-- Every index of the worker's tables (those sql/schema.sql indexes), valid or not: an
-- interrupted CREATE INDEX CONCURRENTLY leaves one that `\di` lists but no query uses.
SELECT i.relname, t.relname, x.indisvalid, x.indisready, pg_get_indexdef(x.indexrelid)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
WHERE t.oid IN (SELECT to_regclass(name) FROM unnest(%(tables)s::text[]) AS name)
ORDER BY i.relname;

-- backlog --
-- Pending items per store, the ten largest, with the totals over every store (the checklist's
-- "instance distribution"). One pass over the pending rows.
WITH per_store AS (
    SELECT instance_id, count(*) AS pending,
        count(*) FILTER (WHERE run_after > now()) AS in_backoff
    FROM job_items
    WHERE status = 'PENDING'
    GROUP BY instance_id
)
SELECT instance_id, pending, count(*) OVER () AS stores, sum(pending) OVER () AS total,
    sum(in_backoff) OVER () AS total_in_backoff
FROM per_store
ORDER BY pending DESC, instance_id
LIMIT 10;

-- oldest_pending --
-- The head of the (status, id) index: ids grow with time, so this is the oldest waiting item.
SELECT id, instance_id, extract(epoch FROM now() - created_at)::float8
FROM job_items
WHERE status = 'PENDING'
ORDER BY id
LIMIT 1;

-- backoff_overdue --
-- Items still in backoff whose run_after has come: a live worker's promote step puts them back
-- in the claim's range at once (at the latest SWEEP_INTERVAL_SECONDS later). The head of
-- idx_job_items_backoff, at most %(cap)s rows.
SELECT count(*), coalesce(extract(epoch FROM now() - min(run_after)), 0)::float8
FROM (
    SELECT run_after FROM job_items
    WHERE status = 'PENDING' AND in_backoff AND run_after <= now()
    ORDER BY run_after
    LIMIT %(cap)s
) AS overdue;

-- expired_leases --
-- PROCESSING items whose lease ran out: a live fleet's reaper returns them within seconds.
SELECT count(*), coalesce(extract(epoch FROM now() - min(lease_expires_at)), 0)::float8,
    array_agg(DISTINCT claimed_by) FILTER (WHERE claimed_by IS NOT NULL)
FROM job_items
WHERE status = 'PROCESSING' AND lease_expires_at < now();

-- recent_failures --
-- FAILED in the last hour, looking only at the newest %(cap)s failures (bounded at any history).
WITH recent AS (
    SELECT error, completed_at FROM job_items
    WHERE status = 'FAILED'
    ORDER BY id DESC
    LIMIT %(cap)s
)
SELECT count(*) FILTER (WHERE completed_at > now() - interval '1 hour'),
    (SELECT error FROM recent WHERE completed_at > now() - interval '1 hour'
     GROUP BY error ORDER BY count(*) DESC LIMIT 1)
FROM recent;

-- connection_limits --
SELECT current_setting('max_connections')::int,
    current_setting('superuser_reserved_connections')::int;

-- connections_by_application --
SELECT coalesce(nullif(application_name, ''), '(none)'), count(*)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND datname IS NOT NULL
GROUP BY 1
ORDER BY 2 DESC, 1;

-- has_heartbeats --
SELECT to_regclass('worker_heartbeats') IS NOT NULL;

-- heartbeats --
-- Every heartbeat row, live or not (the caller tells them apart), newest first.
SELECT worker_id, hostname, pid, extract(epoch FROM now() - seen_at)::float8,
    listener_connected, stats
FROM worker_heartbeats
ORDER BY seen_at DESC;

-- limiter --
SELECT extract(epoch FROM greatest(paused_until - clock_timestamp(), interval '0'))::float8,
    rate_limited_total, extract(epoch FROM clock_timestamp() - updated_at)::float8
FROM rate_limiters
WHERE name = %(name)s;

-- backend_pid --
-- With the port the server itself listens on: a different port from the client's means a
-- pooler or proxy in between.
SELECT pg_backend_pid(), inet_server_port();

-- notify --
SELECT pg_notify(%(channel)s, %(payload)s);

-- unserved_kinds --
-- Kinds of open jobs that none of the kinds given (those the live workers serve) covers: their
-- items stay PENDING until a worker serving them starts. The open jobs only (idx_jobs_open).
SELECT j.kind, count(*) AS open_jobs
FROM jobs j
WHERE j.completed_at IS NULL AND j.kind <> ALL (%(served)s::text[])
GROUP BY j.kind
ORDER BY j.kind;
