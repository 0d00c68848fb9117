-- The operators' dashboard: what one shared snapshot reads. Two tiers: the live blocks run on
-- every refresh and touch only small sets (heartbeats, the limiter's row, items in flight, the
-- newest jobs); the census blocks walk the whole backlog and run on a slower, adaptive period.

-- live_workers --
SELECT worker_id, hostname, pid, started_at,
    extract(epoch FROM clock_timestamp() - seen_at)::float8 AS heartbeat_age,
    listener_connected, stats
FROM worker_heartbeats
WHERE seen_at > now() - make_interval(secs => %(stale_seconds)s)
ORDER BY hostname, pid, worker_id;

-- limiter --
-- The database's clock (every "until" on the page is compared with it), the shared budget's
-- 429s so far and its pause in force, if any; one row even before the limiter's row exists.
SELECT clock_timestamp() AS now, l.rate_limited_total,
    CASE WHEN l.paused_until > clock_timestamp() THEN l.paused_until END AS paused_until
FROM (SELECT 1) AS one
LEFT JOIN rate_limiters l ON l.name = %(name)s;

-- in_flight --
-- Items a worker holds now: a handful per worker, read through the status index. Items in an
-- OpenAI batch (thousands, no lease) are told by their batch instead (open_batches).
SELECT id, job_id, instance_id, claimed_by, claimed_at, lease_expires_at
FROM job_items
WHERE status = 'PROCESSING' AND openai_batch_id IS NULL
ORDER BY id
LIMIT %(limit)s;

-- recent_jobs --
-- The newest jobs and their items by status: the job id index per job, nothing else.
SELECT j.id, j.instance_id, j.status, j.created_at, j.completed_at,
    count(i.id) FILTER (WHERE i.status = 'PENDING') AS pending,
    count(i.id) FILTER (WHERE i.status = 'PROCESSING') AS processing,
    count(i.id) FILTER (WHERE i.status = 'COMPLETED') AS completed,
    count(i.id) FILTER (WHERE i.status = 'FAILED') AS failed,
    count(i.id) FILTER (WHERE i.status NOT IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED'))
        AS other,
    min(i.run_after) FILTER (WHERE i.status = 'PENDING' AND i.run_after > now()) AS backoff_until,
    count(i.id) FILTER (WHERE i.status = 'PENDING' AND i.run_after <= now()) AS ready,
    j.kind,
    -- The batch path's part: items waiting to be collected, and those in our batches.
    count(i.id) FILTER (WHERE i.status = 'PENDING' AND i.tier = 'batch') AS pending_batch,
    count(i.id) FILTER (WHERE i.status = 'PROCESSING' AND i.openai_batch_id IS NOT NULL)
        AS in_batches,
    min(i.openai_batch_id) FILTER (WHERE i.status = 'PROCESSING') AS batch_id,
    count(DISTINCT i.openai_batch_id) FILTER (WHERE i.status = 'PROCESSING') AS batches
FROM (SELECT * FROM jobs ORDER BY id DESC LIMIT %(limit)s) j
LEFT JOIN job_items i ON i.job_id = j.id
GROUP BY j.id, j.instance_id, j.status, j.created_at, j.completed_at, j.kind
ORDER BY j.id DESC;

-- open_batches --
-- Our OpenAI batches not finished yet (a few): what "why waiting" says of the items they hold.
SELECT id, openai_batch_id, state, status, created_at, submitted_at
FROM openai_batches
WHERE state <> 'finished'
ORDER BY id
LIMIT 1000;

-- features --
-- What this database offers the actions: the store policy's table, the job lifecycle's functions.
SELECT to_regclass('store_throttles') IS NOT NULL AS stores,
    to_regprocedure('listener_cancel_job(bigint)') IS NOT NULL AS cancel,
    to_regprocedure('listener_retry_job(bigint)') IS NOT NULL AS retry;

-- store_policies --
-- The store policy's rows (no row: the defaults), and when an rpm_limit lets the next item go.
SELECT s.instance_id, s.weight, s.rpm_limit, s.max_in_flight, s.paused, t.rpm_tat
FROM stores s
LEFT JOIN store_throttles t ON t.instance_id = s.instance_id;

-- latest_jobs --
-- Each store's newest job and how long its first item waited to start (the job lifecycle's
-- started_at): the store's jobs through idx_jobs_instance_id, per store with work. `id + 0`
-- keeps the planner off walking jobs_pkey backwards in search of each store's newest job
-- (18 s at 10,000 stores and 100,000 jobs, against 0.2 s this way).
SELECT s.instance_id, j.id, extract(epoch FROM j.started_at - j.created_at)::float8
FROM unnest(%(stores)s::text[]) AS s(instance_id)
CROSS JOIN LATERAL (
    SELECT id, created_at, started_at FROM jobs
    WHERE jobs.instance_id = s.instance_id
    ORDER BY id + 0 DESC
    LIMIT 1
) AS j;

-- census_serial --
-- The census runs on one core: a parallel plan would take the cores the worker runs on.
SET LOCAL max_parallel_workers_per_gather = 0;

-- store_backlog --
-- The census: every store with PENDING items, one pass over the pending rows (`run_after` and
-- `created_at` need the row, so no index-only scan). Items in backoff count in the backlog but
-- are not ready; the earliest `run_after` among them says until when.
SELECT instance_id,
    count(*) AS backlog,
    count(*) FILTER (WHERE run_after <= now()) AS ready,
    min(run_after) FILTER (WHERE run_after > now()) AS backoff_until,
    extract(epoch FROM now() - min(created_at))::float8 AS oldest_age
FROM job_items
WHERE status = 'PENDING'
GROUP BY instance_id;

-- pause_store --
-- The operator's actions, through the store policy's and the job lifecycle's own names.
INSERT INTO stores (instance_id, paused) VALUES (%(instance_id)s, true)
ON CONFLICT (instance_id) DO UPDATE SET paused = true, updated_at = now();

-- resume_store --
UPDATE stores SET paused = false, updated_at = now() WHERE instance_id = %(instance_id)s;

-- cancel_job --
SELECT listener_cancel_job(%(job_id)s);

-- retry_job --
SELECT listener_retry_job(%(job_id)s);
