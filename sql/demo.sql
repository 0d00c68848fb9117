-- Queries of `listener demo`. They touch the demo's own jobs only (stores named demo-*).

-- progress --
-- One row per demo job, read a few times a second by the live view: the job_id index keeps it
-- to the demo's items, whatever else the database holds.
SELECT j.id,
       count(i.id) FILTER (WHERE i.status = 'COMPLETED') AS completed,
       count(i.id) FILTER (WHERE i.status = 'FAILED') AS failed,
       extract(epoch FROM j.completed_at - j.created_at)::float8 AS took,
       -- Items in a Batch API batch, or answered by one.
       count(i.id) FILTER (
           WHERE i.openai_batch_id IS NOT NULL OR i.served_tier = 'batch'
       ) AS batched
FROM jobs j
LEFT JOIN job_items i ON i.job_id = j.id
WHERE j.id = ANY(%(job_ids)s::bigint[])
GROUP BY j.id;

-- clear_old_jobs --
-- The embedded database is the demo's scratch space: a previous run's jobs go (items cascade).
DELETE FROM jobs WHERE instance_id LIKE %(pattern)s;

-- delete_batches --
-- The batches of this run's items, when they hold no other item: the stub that answered them
-- is gone, and no worker must poll them at OpenAI.
DELETE FROM openai_batches b
WHERE b.id IN (
    SELECT DISTINCT i.openai_batch_id FROM job_items i
    WHERE i.job_id = ANY(%(job_ids)s::bigint[]) AND i.openai_batch_id IS NOT NULL
)
AND NOT EXISTS (
    SELECT 1 FROM job_items o
    WHERE o.openai_batch_id = b.id AND NOT o.job_id = ANY(%(job_ids)s::bigint[])
);

-- delete_jobs --
DELETE FROM jobs WHERE id = ANY(%(job_ids)s::bigint[]);

-- delete_usage --
-- What the demo's stores used (their cost): not a real store's.
DELETE FROM store_usage_recent WHERE instance_id LIKE %(pattern)s;

-- delete_daily_usage --
DELETE FROM store_usage_daily WHERE instance_id LIKE %(pattern)s;

-- delete_monthly_usage --
DELETE FROM store_usage_monthly WHERE instance_id LIKE %(pattern)s;

-- delete_limiter --
DELETE FROM rate_limiters WHERE name = %(name)s;
