-- The planner's statistics of the two tables a worker's statements read, against the rows they
-- hold now (see listener/statistics.py for why they are watched).

-- table_statistics --
-- Per table: the rows ANALYZE last counted (-1: never analyzed), the rows live now (the
-- cumulative statistics: inserts and deletes of committed transactions, seconds old at most),
-- and whether this role may ANALYZE it (the table's owner, the database's owner, a superuser).
SELECT c.relname,
    c.reltuples,
    coalesce(s.n_live_tup, 0) AS live_rows,
    pg_has_role(c.relowner, 'USAGE') OR pg_has_role(d.datdba, 'USAGE') AS may_analyze
FROM pg_class c
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
CROSS JOIN pg_database d
WHERE c.oid IN ('job_items'::regclass, 'jobs'::regclass)
  AND d.datname = current_database()
ORDER BY c.relname;

-- analyze_lock --
-- One process of the fleet analyzes at a time, and it reads the estimate again once it holds
-- the lock: another may have analyzed the table in between.
SELECT pg_try_advisory_xact_lock(%(key)s), reltuples
FROM pg_class
WHERE oid = %(table)s::regclass;

-- estimated_rows --
-- After the ANALYZE, in its transaction: it skips a table another session holds (a running
-- VACUUM, whose end updates the estimate too), which shows as an estimate left as it was.
SELECT reltuples FROM pg_class WHERE oid = %(table)s::regclass;
