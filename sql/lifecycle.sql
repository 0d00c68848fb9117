-- Cancel and retry, for the command line and the dashboard: thin calls of the SQL functions in
-- schema.sql, which other programs call the same way.

-- cancel_job --
SELECT listener_cancel_job(%(job_id)s);

-- cancel_store --
SELECT listener_cancel_store(%(instance_id)s);

-- retry_job --
SELECT listener_retry_job(%(job_id)s);

-- retry_store --
SELECT listener_retry_store(%(instance_id)s);
