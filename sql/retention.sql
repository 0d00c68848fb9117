-- Retention: finished jobs older than a cutoff are deleted with their items, a small batch per
-- transaction. Only jobs that have ended (completed_at set) are touched, so no unfinished item
-- is ever deleted; finished rows are never locked by a claim, so a batch blocks no claim.

-- prune_lock --
-- One process of the fleet at a time; held until the batch's transaction ends.
SELECT pg_try_advisory_xact_lock(%(key)s);

-- prune_items --
-- Up to %(items)s items of the oldest finished jobs. The jobs are share-locked (skipping any a
-- cancel or a retry holds), so a retry cannot reopen a job while its items are being deleted.
WITH old_jobs AS (
    SELECT id FROM jobs
    WHERE completed_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY completed_at
    LIMIT %(jobs)s
    FOR SHARE SKIP LOCKED
)
DELETE FROM job_items
WHERE id IN (
    SELECT i.id FROM job_items i
    WHERE i.job_id IN (SELECT id FROM old_jobs)
    LIMIT %(items)s
);

-- prune_jobs --
-- The oldest finished jobs whose items are all gone (deleted by the statement before, in this
-- transaction).
DELETE FROM jobs j
WHERE j.id IN (
    SELECT id FROM jobs
    WHERE completed_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY completed_at
    LIMIT %(jobs)s
    FOR UPDATE SKIP LOCKED
)
AND NOT EXISTS (SELECT 1 FROM job_items i WHERE i.job_id = j.id);

-- prune_preview --
-- What a prune would delete now (`listener prune --dry-run`).
SELECT count(DISTINCT j.id), count(i.id)
FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id
WHERE j.completed_at < now() - make_interval(secs => %(older_than)s);
