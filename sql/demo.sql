-- Queries of `listener demo`. They touch the demo's own jobs only (stores named demo-*).

-- progress --
-- One row per demo job, read a few times a second by the live view: the job_id index keeps it
-- to the demo's items, whatever else the database holds.
SELECT j.id,
       count(i.id) FILTER (WHERE i.status = 'COMPLETED') AS completed,
       count(i.id) FILTER (WHERE i.status = 'FAILED') AS failed,
       extract(epoch FROM j.completed_at - j.created_at)::float8 AS took
FROM jobs j
LEFT JOIN job_items i ON i.job_id = j.id
WHERE j.id = ANY(%(job_ids)s::bigint[])
GROUP BY j.id;

-- clear_old_jobs --
-- The embedded database is the demo's scratch space: a previous run's jobs go (items cascade).
DELETE FROM jobs WHERE instance_id LIKE %(pattern)s;

-- delete_jobs --
DELETE FROM jobs WHERE id = ANY(%(job_ids)s::bigint[]);

-- delete_limiter --
DELETE FROM rate_limiters WHERE name = %(name)s;
