-- Items waiting out a backoff leave the claim's index (issue 25, weakness 5): the pending index
-- orders priority before run_after, so a store's higher-priority items in backoff sat before
-- its due ones and each claim of the store read past them all. `job_items.in_backoff` (set by
-- the retry outcome, and for an insert dated later by the trigger job_items_mark_backoff)
-- takes them out of idx_job_items_pending, and a small index by due time
-- (idx_job_items_backoff) lets the promote step put them back when due. Without blocking
-- writers: the column has a constant default (no rewrite), the items in backoff now are
-- flagged, and the indexes are built CONCURRENTLY; the new pending index is built beside the
-- old one, which is dropped only then, so claims keep an index all along. Every statement can
-- run again. Workers of the release before leave their retries unflagged (read past until due,
-- as before) and promote nothing (the new release's workers promote every flagged item due).
-- transaction: off
-- up --
ALTER TABLE job_items ADD COLUMN IF NOT EXISTS in_backoff boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION job_items_mark_backoff() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.in_backoff := true;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS job_items_mark_backoff ON job_items;
CREATE TRIGGER job_items_mark_backoff
    BEFORE INSERT ON job_items
    FOR EACH ROW WHEN (NEW.status = 'PENDING' AND NEW.run_after > now() AND NOT NEW.in_backoff)
    EXECUTE FUNCTION job_items_mark_backoff();

-- The items in backoff now.
UPDATE job_items SET in_backoff = true
WHERE status = 'PENDING' AND run_after > now() AND NOT in_backoff;

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_backoff;
CREATE INDEX CONCURRENTLY idx_job_items_backoff ON job_items (run_after)
    WHERE status = 'PENDING' AND in_backoff;

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending_next;
CREATE INDEX CONCURRENTLY idx_job_items_pending_next
    ON job_items (instance_id, priority DESC, run_after, id)
    WHERE status = 'PENDING' AND NOT in_backoff;
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
ALTER INDEX idx_job_items_pending_next RENAME TO idx_job_items_pending;

-- down --
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending_previous;
CREATE INDEX CONCURRENTLY idx_job_items_pending_previous
    ON job_items (instance_id, priority DESC, run_after, id) WHERE status = 'PENDING';
DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_pending;
ALTER INDEX idx_job_items_pending_previous RENAME TO idx_job_items_pending;

DROP INDEX CONCURRENTLY IF EXISTS idx_job_items_backoff;
DROP TRIGGER IF EXISTS job_items_mark_backoff ON job_items;
DROP FUNCTION IF EXISTS job_items_mark_backoff();
ALTER TABLE job_items DROP COLUMN IF EXISTS in_backoff;
