-- Checks on the database itself, before a worker starts.

-- schema_ready --
-- Has `listener migrate up` run here? The worker checks before it starts.
SELECT to_regclass('job_items') IS NOT NULL;
