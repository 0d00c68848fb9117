-- The rule that ends a job (its final status, and the guard against a stale look at its row)
-- in one function, for the outcome writer's finish_jobs and the reaper's sweep.
-- up --
CREATE FUNCTION listener_end_finished_jobs(job_ids bigint[]) RETURNS SETOF bigint
    LANGUAGE plpgsql AS $$
BEGIN
    -- Only the job row as it was looked at is closed (its xmin): a retry that reopened the job
    -- while this statement waited for its lock committed a new row version, and the stale look
    -- (no open item) must not close it.
    RETURN QUERY
    WITH done AS (
        SELECT j.id, j.xmin AS seen
        FROM jobs j
        WHERE j.id = ANY(job_ids)
          AND j.completed_at IS NULL
          AND NOT EXISTS (
              SELECT 1 FROM job_items open_item
              WHERE open_item.job_id = j.id AND open_item.status IN ('PENDING', 'PROCESSING')
          )
    )
    UPDATE jobs j
    SET status = CASE
            WHEN j.status = 'CANCELLED' THEN 'CANCELLED'
            WHEN EXISTS (SELECT 1 FROM job_items f WHERE f.job_id = j.id AND f.status = 'FAILED')
                THEN 'COMPLETED_WITH_ERRORS'
            ELSE 'COMPLETED'
        END,
        completed_at = now(),
        updated_at = now()
    FROM done
    WHERE j.id = done.id AND j.xmin = done.seen
    RETURNING j.id;
END;
$$;

-- down --
DROP FUNCTION IF EXISTS listener_end_finished_jobs(bigint[]);
