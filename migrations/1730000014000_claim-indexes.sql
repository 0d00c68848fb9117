-- The indexes the event-driven claimer reads, built without blocking writes, and the status
-- CHECK validated without an exclusive lock.
-- transaction: off
-- up --
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_status_check;

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
CREATE INDEX CONCURRENTLY idx_job_items_pending ON job_items (instance_id, id)
    WHERE status = 'PENDING';

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_open_job;
CREATE INDEX CONCURRENTLY idx_job_items_open_job ON job_items (job_id)
    WHERE status IN ('PENDING', 'PROCESSING');

DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_instance_id;
CREATE INDEX CONCURRENTLY idx_jobs_instance_id ON jobs (instance_id);

-- down --
DROP INDEX CONCURRENTLY IF EXISTS idx_jobs_instance_id;
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_open_job;
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
