-- The SQL of bench.fleet_budget, beyond bench/peers.sql's.

-- statements --
-- This database's statements in the window by kind: the limiter's reservations and pauses, the
-- claims (`claim` in sql/items.sql: its constants are normalised away, its shape is not), and all
-- of them; the limiter's execution time.
SELECT coalesce(sum(calls) FILTER (WHERE query LIKE '%%INSERT INTO rate_limiters%%'), 0),
       coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%%INSERT INTO rate_limiters%%'), 0),
       coalesce(sum(calls) FILTER (WHERE query LIKE '%%ARRAY(SELECT id FROM picked)%%'), 0),
       coalesce(sum(calls), 0)
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %(dbname)s;

-- started_twice --
-- Items started more than once (their attempts counted twice): none when nothing is done twice.
SELECT count(*) FILTER (WHERE attempts > 1), count(*) FILTER (WHERE status = 'PROCESSING')
FROM job_items;
