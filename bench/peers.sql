-- The SQL of bench.peers, bench.db_work and bench.fleet_budget: each system's tables, and the
-- server's counters.

-- reset_listener --
TRUNCATE job_items, jobs, worker_heartbeats, rate_limiters;

-- reset_pgqueuer --
TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics;

-- reset_procrastinate --
TRUNCATE procrastinate_jobs CASCADE;

-- reset_graphile --
TRUNCATE graphile_worker._private_jobs, graphile_worker._private_job_queues CASCADE;

-- add_jobs_graphile --
-- Graphile's own batch enqueue (what its `addJobs` calls): one no-op job per key.
SELECT graphile_worker.add_jobs(array(
    SELECT row('noop', json_build_object('key', k), NULL, NULL, NULL, NULL, NULL, NULL)
           ::graphile_worker.job_spec
    FROM unnest(%(keys)s::text[]) AS k));

-- add_jobs_graphile_payloads --
-- bench.enqueue: the statement Graphile's addJobs sends (helpers.js, 0.18.0): the job specs as
-- one JSON array, its rows returned.
SELECT *
FROM graphile_worker.add_jobs(
    array(SELECT json_populate_recordset(NULL::graphile_worker.job_spec, %(specs)s::json)),
    false
);

-- add_job_graphile --
SELECT graphile_worker.add_job('noop', json_build_object('key', %(key)s::text));

-- left_graphile --
-- bench-poll: Graphile deletes a job when it completes; the jobs not done yet.
SELECT count(*) FROM graphile_worker._private_jobs;

-- any_left_graphile --
-- bench-poll: cheaper than the count near the end of a run.
SELECT EXISTS (SELECT FROM graphile_worker._private_jobs);

-- done_listener --
-- bench-poll: jobs done so far (bench.db_work leaves these polls out of its counts).
SELECT count(*) FROM job_items WHERE status = 'COMPLETED';

-- done_pgqueuer --
-- bench-poll: jobs done so far.
SELECT count(*) FROM pgqueuer_log WHERE status = 'successful';

-- done_procrastinate --
-- bench-poll: jobs done so far.
SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded';

-- last_done_listener --
-- When the last job's completion was written, on the database's clock (Unix seconds).
SELECT extract(epoch FROM max(completed_at))::float8 FROM job_items;

-- last_done_pgqueuer --
SELECT extract(epoch FROM max(created))::float8 FROM pgqueuer_log WHERE status = 'successful';

-- last_done_procrastinate --
SELECT extract(epoch FROM max(at))::float8 FROM procrastinate_events WHERE type = 'succeeded';

-- completions_per_store --
SELECT instance_id, extract(epoch FROM completed_at)::float8 FROM job_items;

-- other_sessions --
-- The sessions on this database but this one (a worker's pool and LISTEN connections).
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
  AND application_name <> 'bench-poll';

-- counters --
-- This database's transactions and statements (the harness's polls left out), the server's WAL.
SELECT d.xact_commit + d.xact_rollback,
       (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s
        WHERE s.dbid = d.datid AND s.query NOT LIKE '%%bench-poll%%'),
       w.wal_records, w.wal_fpi, w.wal_bytes
FROM pg_stat_database d, pg_stat_wal w
WHERE d.datname = %(dbname)s;

-- by_statement --
-- The statements run most on this database: where the round trips go, and the time each
-- statement took in the server (milliseconds, planning and execution).
SELECT calls, regexp_replace(left(query, 300), '\s+', ' ', 'g'),
       total_exec_time + total_plan_time
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %(dbname)s AND s.query NOT LIKE '%%bench-poll%%'
ORDER BY calls DESC
LIMIT 8;

-- wal_position --
SELECT pg_current_wal_lsn()::text;

-- wal_by_relation --
-- The WAL written between two positions (pg_walinspect), by the relation of each record's
-- first block, named by its file node (the database in question maps it to a name). A record's
-- length includes its full-page images; fpi_bytes says how much of it they are.
SELECT substring(block_ref FROM 'rel \d+/\d+/(\d+)') AS filenode,
       count(*) AS records,
       sum(record_length) AS record_bytes,
       sum(fpi_length) AS fpi_bytes
FROM pg_get_wal_records_info(%(start)s::pg_lsn, %(stop)s::pg_lsn)
GROUP BY 1
ORDER BY sum(record_length) DESC;

-- relation_names --
SELECT pg_relation_filenode(oid)::text, relname FROM pg_class
WHERE pg_relation_filenode(oid) IS NOT NULL;

-- starts_between --
-- Items claimed (started) in a window, on the database's clock (Unix seconds).
SELECT extract(epoch FROM claimed_at)::float8 FROM job_items
WHERE claimed_at >= to_timestamp(%(start)s) AND claimed_at < to_timestamp(%(stop)s);

-- limiter_statements --
-- The limiter's reservations and pauses on this database: how many, and their execution time.
SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0)
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %(dbname)s AND s.query LIKE '%%INSERT INTO rate_limiters%%';
