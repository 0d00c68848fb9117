-- The soak's own SQL (`python -m bench.soak`): the producer's inserts and the final checks.

-- submit --
-- One tick of the producer: several jobs, each with its own products, in one statement (one
-- transaction). A product that is JSON null becomes a NULL payload, as a careless client sends.
-- Each job's store is distinct within a tick, which is what the join on instance_id relies on.
WITH wanted AS (
    SELECT * FROM jsonb_to_recordset(%(jobs)s::jsonb) AS w(instance_id text, products jsonb)
), new_jobs AS (
    INSERT INTO jobs (instance_id)
    SELECT instance_id FROM wanted
    RETURNING id, instance_id
), new_items AS (
    INSERT INTO job_items (job_id, instance_id, product_id, payload)
    SELECT j.id, j.instance_id, p.product->>'product_id', nullif(p.product->'payload', 'null')
    FROM new_jobs j
    JOIN wanted w USING (instance_id)
    CROSS JOIN LATERAL jsonb_array_elements(w.products) WITH ORDINALITY AS p(product, n)
    ORDER BY j.id, p.n
    RETURNING job_id
)
SELECT job_id, count(*) FROM new_items GROUP BY job_id;

-- tick_landed --
-- After a connection died during a commit: did this tick's jobs land? (Product ids carry the
-- tick number, so the answer is exact.)
SELECT job_id, count(*) FROM job_items WHERE product_id LIKE %(prefix)s GROUP BY job_id;

-- connections --
-- Every connection to this database but the one asking, by application.
SELECT coalesce(nullif(application_name, ''), '?'), count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
GROUP BY 1;

-- terminate_all --
-- A database restart as clients see it: every session of the soak database is cut.
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE datname = %(dbname)s AND pid <> pg_backend_pid();

-- completed_seconds --
-- Completions per second since the start (Unix seconds, the database's clock, same host).
SELECT floor(extract(epoch FROM completed_at))::bigint AS second, count(*)
FROM job_items
WHERE status = 'COMPLETED'
GROUP BY 1
ORDER BY 1;

-- items_per_job --
SELECT job_id, count(*) FROM job_items GROUP BY job_id;

-- open_items --
SELECT status, count(*) FROM job_items WHERE status IN ('PENDING', 'PROCESSING') GROUP BY status;

-- failed_without_reason --
SELECT id, product_id FROM job_items
WHERE status = 'FAILED' AND coalesce(btrim(error), '') = ''
ORDER BY id;

-- good_failed --
-- Items the producer made valid that still FAILED, with their reason.
SELECT id, instance_id, product_id, attempts, error FROM job_items
WHERE status = 'FAILED' AND product_id NOT LIKE '%%-bad-%%'
ORDER BY id;

-- bad_not_failed --
-- Items the producer made invalid that did not end FAILED.
SELECT id, instance_id, product_id, status, error FROM job_items
WHERE status <> 'FAILED' AND product_id LIKE '%%-bad-%%'
ORDER BY id;

-- completed_without_result --
SELECT count(*) FROM job_items WHERE status = 'COMPLETED' AND result IS NULL;

-- failure_reasons --
-- The bad items' reasons, by kind of bad payload (the product id carries the kind).
SELECT split_part(product_id, '-', 3) AS kind, error, count(*)
FROM job_items
WHERE status = 'FAILED'
GROUP BY 1, 2
ORDER BY 1, 3 DESC;

-- jobs_not_final --
-- A job is final when it is COMPLETED (no FAILED item) or COMPLETED_WITH_ERRORS (some), with
-- its completed_at, once none of its items is open.
SELECT j.id, j.status, j.completed_at IS NOT NULL,
       count(i.id) FILTER (WHERE i.status = 'FAILED'),
       count(i.id) FILTER (WHERE i.status IN ('PENDING', 'PROCESSING'))
FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id
GROUP BY j.id
HAVING j.completed_at IS NULL
    OR j.status NOT IN ('COMPLETED', 'COMPLETED_WITH_ERRORS')
    OR (j.status = 'COMPLETED') <> (count(i.id) FILTER (WHERE i.status = 'FAILED') = 0)
ORDER BY j.id;

-- attempts --
SELECT status, attempts, count(*) FROM job_items GROUP BY 1, 2 ORDER BY 1, 2;

-- backlog --
-- Items a healthy fleet could be working on now (PENDING and due), and those in flight.
SELECT count(*) FILTER (WHERE status = 'PENDING' AND run_after <= now()),
       count(*) FILTER (WHERE status = 'PROCESSING')
FROM job_items
WHERE status IN ('PENDING', 'PROCESSING');

-- held_by_pid --
-- The items a worker process held when it died (its worker id is host:pid:random).
SELECT id FROM job_items
WHERE status = 'PROCESSING' AND claimed_by LIKE '%%:' || %(pid)s::text || ':%%'
ORDER BY id;

-- items_fate --
-- What became of some items in the end (Unix seconds for completed_at).
SELECT id, status, attempts, extract(epoch FROM completed_at)::float8, product_id
FROM job_items
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id;
