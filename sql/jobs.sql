-- Jobs as a client submits them, and their progress.

-- create_job --
-- With what the fleet registered of its kind (no row: no worker has served it yet), from which
-- the producer resolves its items' tier: no round trip of its own.
WITH job AS (
    INSERT INTO jobs (instance_id, priority, kind, options, tier)
    VALUES (%(instance_id)s, %(priority)s, %(kind)s, %(options)s::jsonb, %(tier)s)
    RETURNING id, kind
)
SELECT job.id, k.tier, k.batchable, k.auto_batch_min_items, k.auto_batch_max_priority
FROM job LEFT JOIN job_kinds k ON k.name = job.kind;

-- copy_items --
-- Every item of the job in one COPY: one statement, so the trigger sends one notification.
-- Each item carries its job's priority, kind and resolved tier, which the producer knows: the
-- fill triggers' WHEN clauses then skip them, instead of a lookup of the job per row
-- (bench.notify_commits).
COPY job_items (job_id, instance_id, product_id, payload, priority, kind, tier) FROM STDIN;

-- job_progress --
SELECT j.id, j.instance_id, j.status, j.created_at, j.completed_at,
       count(i.id) FILTER (WHERE i.status = 'PENDING') AS pending,
       count(i.id) FILTER (WHERE i.status = 'PROCESSING') AS processing,
       count(i.id) FILTER (WHERE i.status = 'COMPLETED') AS completed,
       count(i.id) FILTER (WHERE i.status = 'FAILED') AS failed,
       count(i.id) FILTER (WHERE i.status = 'CANCELLED') AS cancelled
FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id
WHERE j.id = %(job_id)s
GROUP BY j.id;

-- recent_jobs --
SELECT j.id, j.instance_id, j.status, j.created_at, j.completed_at,
       count(i.id) FILTER (WHERE i.status = 'PENDING') AS pending,
       count(i.id) FILTER (WHERE i.status = 'PROCESSING') AS processing,
       count(i.id) FILTER (WHERE i.status = 'COMPLETED') AS completed,
       count(i.id) FILTER (WHERE i.status = 'FAILED') AS failed,
       count(i.id) FILTER (WHERE i.status = 'CANCELLED') AS cancelled
FROM (SELECT * FROM jobs ORDER BY id DESC LIMIT %(limit)s) j
LEFT JOIN job_items i ON i.job_id = j.id
GROUP BY j.id, j.instance_id, j.status, j.created_at, j.completed_at
ORDER BY j.id DESC;

-- backlog_by_store --
SELECT instance_id,
       count(*) FILTER (WHERE status = 'PENDING') AS pending,
       count(*) FILTER (WHERE status = 'PROCESSING') AS processing
FROM job_items
WHERE status IN ('PENDING', 'PROCESSING')
GROUP BY instance_id
ORDER BY pending DESC, instance_id
LIMIT %(limit)s;

-- failed_items --
SELECT id, product_id, attempts, error FROM job_items
WHERE job_id = %(job_id)s AND status = 'FAILED'
ORDER BY id
LIMIT %(limit)s;

-- job_batches --
-- The OpenAI batches holding the job's items now, and how many of them each.
SELECT b.id, b.openai_batch_id, b.state, b.status, b.submitted_at, count(*) AS items
FROM job_items i
JOIN openai_batches b ON b.id = i.openai_batch_id
WHERE i.job_id = %(job_id)s AND i.status = 'PROCESSING'
GROUP BY b.id
ORDER BY b.id;
