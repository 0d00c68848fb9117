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

-- add_backlog_priorities --
-- As add_backlog, with priorities in use: one item in ten at 10, one in ten at -5, the rest 0.
WITH wanted AS (
    SELECT * FROM unnest(%(stores)s::text[], %(counts)s::int[]) AS w(instance_id, items)
), new_jobs AS (
    INSERT INTO jobs (instance_id)
    SELECT instance_id FROM wanted
    RETURNING id, instance_id
)
INSERT INTO job_items (job_id, instance_id, priority, product_id, payload)
SELECT j.id, j.instance_id, CASE n %% 10 WHEN 0 THEN 10 WHEN 1 THEN -5 ELSE 0 END, 'p' || n,
       jsonb_build_object('name', 'Product ' || n || ' of ' || j.instance_id, 'price', n)
FROM new_jobs j
JOIN wanted w USING (instance_id)
CROSS JOIN LATERAL generate_series(1, w.items) AS n
ORDER BY j.id, n;

-- backoff_half --
-- The oldest half of each named store's PENDING items waits out a retry's backoff, flagged as a
-- retry outcome leaves them.
UPDATE job_items SET run_after = now() + interval '1 hour', in_backoff = true
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY instance_id ORDER BY id) AS n,
               count(*) OVER (PARTITION BY instance_id) AS total
        FROM job_items WHERE instance_id = ANY(%(stores)s::text[]) AND status = 'PENDING'
    ) ranked
    WHERE n <= total / 2
);

-- add_priority_item --
-- A click: one item at a priority, in a job of its own; returns the commit's side of the clock.
WITH job AS (
    INSERT INTO jobs (instance_id, priority) VALUES (%(store)s, %(priority)s) RETURNING id
)
INSERT INTO job_items (job_id, instance_id, product_id, payload)
SELECT job.id, %(store)s, %(product)s, '{"name": "the product clicked"}'::jsonb FROM job
RETURNING id;

-- claimed_at --
SELECT extract(epoch FROM claimed_at)::float8 FROM job_items WHERE id = %(id)s;

-- starts --
-- Every item claimed so far: its store and when (Unix seconds, the database's clock).
SELECT instance_id, extract(epoch FROM claimed_at)::float8
FROM job_items
WHERE claimed_at IS NOT NULL
ORDER BY claimed_at;

-- set_policy --
INSERT INTO stores AS s (instance_id, weight, rpm_limit, max_in_flight, paused)
VALUES (%(store)s, %(weight)s, %(rpm_limit)s, %(max_in_flight)s, %(paused)s)
ON CONFLICT (instance_id) DO UPDATE
SET weight = excluded.weight, rpm_limit = excluded.rpm_limit,
    max_in_flight = excluded.max_in_flight, paused = excluded.paused, updated_at = now();

-- pause --
-- Pause or resume a store; returns when (Unix seconds), just before the commit.
UPDATE stores SET paused = %(paused)s, updated_at = now()
WHERE instance_id = %(store)s
RETURNING extract(epoch FROM clock_timestamp())::float8;

-- in_flight --
SELECT count(*) FROM job_items WHERE instance_id = %(store)s AND status = 'PROCESSING';

-- last_claimed --
SELECT extract(epoch FROM max(claimed_at))::float8 FROM job_items WHERE instance_id = %(store)s;

-- first_claimed_after --
SELECT extract(epoch FROM min(claimed_at))::float8 FROM job_items
WHERE instance_id = %(store)s AND claimed_at > to_timestamp(%(after)s);
-- enqueue_one_item --
-- The naive producer: one INSERT per item (what a loop over products in an ORM does).
INSERT INTO job_items (job_id, instance_id, product_id, payload)
VALUES (%(job_id)s, %(instance_id)s, %(product_id)s, %(payload)s);

-- enqueue_json_array --
-- The producer before COPY: every item in one INSERT from a JSON array parameter.
INSERT INTO job_items (job_id, instance_id, product_id, payload)
SELECT %(job_id)s, %(instance_id)s,
       coalesce(product->>'id', product->>'product_id', 'product-' || position),
       product
FROM jsonb_array_elements(%(products)s::jsonb) WITH ORDINALITY AS p(product, position);

-- empty_jobs --
TRUNCATE job_items, jobs;

-- add_finished --
-- Jobs that ended 30 days ago, with their COMPLETED items (a result each), as retention finds
-- them: %(jobs)s jobs of %(items)s items.
WITH new_jobs AS (
    INSERT INTO jobs (instance_id, status, completed_at, started_at)
    SELECT 'done-' || (n %% 100), 'COMPLETED', now() - interval '30 days',
           now() - interval '30 days'
    FROM generate_series(1, %(jobs)s) n
    RETURNING id, instance_id
)
INSERT INTO job_items (job_id, instance_id, product_id, payload, status, result, attempts,
                       claimed_at, completed_at)
SELECT j.id, j.instance_id, 'p' || n, jsonb_build_object('name', 'Product ' || n),
       'COMPLETED', jsonb_build_object('text', repeat('A fine product. ', 20)), 1,
       now() - interval '30 days', now() - interval '30 days'
FROM new_jobs j CROSS JOIN generate_series(1, %(items)s) n;

-- add_kinds_backlog --
-- One job per (store, kind) with its options, and its items, in one statement.
WITH wanted AS (
    SELECT * FROM unnest(
        %(stores)s::text[], %(kinds)s::text[], %(options)s::jsonb[], %(counts)s::int[]
    ) AS w(instance_id, kind, options, items)
), new_jobs AS (
    INSERT INTO jobs (instance_id, kind, options)
    SELECT instance_id, kind, options FROM wanted
    RETURNING id, instance_id, kind
)
INSERT INTO job_items (job_id, instance_id, product_id, payload)
SELECT j.id, j.instance_id, j.kind || '-' || n,
    jsonb_build_object('name', 'Product ' || n || ' of ' || j.instance_id,
        'description', 'A well-made product our customers love.')
FROM new_jobs j
JOIN wanted w ON w.instance_id = j.instance_id AND w.kind = j.kind
CROSS JOIN LATERAL generate_series(1, w.items) AS n;

-- starts_by_second --
-- Items claimed per store and whole second since `since` (Unix seconds).
SELECT instance_id, floor(extract(epoch FROM claimed_at) - %(since)s)::int AS second, count(*)
FROM job_items
WHERE claimed_at IS NOT NULL
GROUP BY 1, 2;

-- first_claim --
SELECT extract(epoch FROM min(i.claimed_at) - min(j.created_at))::float8
FROM job_items i JOIN jobs j ON j.id = i.job_id
WHERE i.instance_id = %(store)s;

-- claims_by_worker --
-- Per worker process (its heartbeat), the items it claimed by kind, and its limiter's grants.
SELECT w.pid, i.kind, count(i.id), (w.stats ->> 'requestsInLastMinute')::int
FROM worker_heartbeats w
LEFT JOIN job_items i ON i.claimed_by = w.worker_id
GROUP BY w.pid, i.kind, w.stats;

-- add_open_jobs --
-- `count` open jobs over 1,000 stores, one PENDING item each (bench.stranded_jobs).
WITH new_jobs AS (
    INSERT INTO jobs (instance_id)
    SELECT 'store-' || (n %% 1000) FROM generate_series(1, %(count)s) n
    RETURNING id, instance_id
)
INSERT INTO job_items (job_id, instance_id, product_id, payload)
SELECT id, instance_id, 'p1', '{"name": "P"}'::jsonb FROM new_jobs;

-- strand_jobs --
-- Every `every`-th open job gets its items finished without being closed: stranded.
UPDATE job_items SET status = 'COMPLETED', completed_at = now()
WHERE job_id IN (SELECT id FROM jobs WHERE completed_at IS NULL AND id %% %(every)s = 0);

-- backoff_store --
-- One store for bench.backoff_claims: `due` items at priority 0, due now, and `backoff` items at
-- priority 10 waiting out a retry's backoff (an hour), as a retry outcome leaves them (the flag
-- given, so the trigger has nothing to do). One job, one statement.
WITH job AS (
    INSERT INTO jobs (instance_id) VALUES (%(store)s) RETURNING id
)
INSERT INTO job_items (
    job_id, instance_id, product_id, payload, priority, kind, run_after, in_backoff
)
SELECT job.id, %(store)s, 'p' || n, jsonb_build_object('name', 'Product ' || n),
    CASE WHEN n <= %(backoff)s THEN 10 ELSE 0 END, 'product_description',
    CASE WHEN n <= %(backoff)s THEN now() + interval '1 hour' ELSE now() END,
    n <= %(backoff)s
FROM job CROSS JOIN generate_series(1, %(backoff)s + %(due)s) AS n;

-- pending_index_before --
-- The claim's index as it was before items in backoff left it (bench.backoff_claims).
CREATE INDEX IF NOT EXISTS bench_pending_before ON job_items (instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING';

-- backoff_due --
-- `due` items of `store` in backoff whose run_after has come, as a retry's backoff becomes once
-- it ends (bench.backoff_claims times the promote step on them).
WITH job AS (
    INSERT INTO jobs (instance_id) VALUES (%(store)s) RETURNING id
)
INSERT INTO job_items (
    job_id, instance_id, product_id, payload, priority, kind, run_after, in_backoff
)
SELECT job.id, %(store)s, 'p' || n, jsonb_build_object('name', 'Product ' || n), 0,
    'product_description', now() - interval '1 second', true
FROM job CROSS JOIN generate_series(1, %(due)s) AS n;
