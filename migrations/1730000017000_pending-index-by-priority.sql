-- The scans of the store-policy migration, without blocking writers: the priority CHECKs are
-- validated (SHARE UPDATE EXCLUSIVE), and idx_job_items_pending is rebuilt CONCURRENTLY with
-- priority and run_after in its key, beside the old one, which is dropped only then: claims
-- keep an index all along. Every statement can run again.
-- transaction: off
-- up --
ALTER TABLE jobs VALIDATE CONSTRAINT jobs_priority_range;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_priority_range;

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending_next;
CREATE INDEX CONCURRENTLY idx_job_items_pending_next
    ON job_items (instance_id, priority DESC, run_after, id) WHERE status = 'PENDING';
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
ALTER INDEX idx_job_items_pending_next RENAME TO idx_job_items_pending;

-- down --
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending_previous;
CREATE INDEX CONCURRENTLY idx_job_items_pending_previous
    ON job_items (instance_id, id) WHERE status = 'PENDING';
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
ALTER INDEX idx_job_items_pending_previous RENAME TO idx_job_items_pending;
