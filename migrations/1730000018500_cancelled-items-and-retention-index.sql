-- Items may end CANCELLED (the CHECK is swapped: added NOT VALID, then validated, so the scan
-- of existing rows blocks no writer), the index retention walks to find the oldest finished
-- jobs and the one the reaper's sweep reads for jobs never closed, built without blocking writes.
-- transaction: off
-- up --
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_status_check;
ALTER TABLE job_items ADD CONSTRAINT job_items_status_check
    CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED')) NOT VALID;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_status_check;

DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_finished;
CREATE INDEX CONCURRENTLY idx_jobs_finished ON jobs (completed_at)
    WHERE completed_at IS NOT NULL;

DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_open;
CREATE INDEX CONCURRENTLY idx_jobs_open ON jobs (id) WHERE completed_at IS NULL;

-- down --
DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_open;
DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_finished;
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_status_check;
ALTER TABLE job_items ADD CONSTRAINT job_items_status_check
    CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')) NOT VALID;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_status_check;
