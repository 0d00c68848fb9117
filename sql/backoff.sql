-- Items waiting out a backoff (job_items.in_backoff): out of the claim's index until they are due.

-- promote_due --
-- Put the items whose backoff has ended back in the claim's range (idx_job_items_pending): the
-- %(batch)s earliest due, read from the head of idx_job_items_backoff, so a pass costs its
-- batch, never the number still waiting. The UPDATE's statement trigger
-- (job_items_notify_ready) announces their stores on job_items_ready, '<store>' or
-- '<store>\x1f<kind>', as an insert does: every process hears of them at their due time.
-- One process of the fleet at a time: the advisory lock is tried, never waited for (`locked`
-- false: another process is promoting now, and its pass sees the same due items). SKIP
-- LOCKED: an item another transaction holds (a cancel) is left for the next pass, not waited
-- for. `next_due_in`: seconds until the first item still in backoff is due (NULL: none), read
-- after the items promoted now, so the caller sleeps until then; an item skipped as locked is
-- not in it (it is due already), or a pass would follow a pass while its lock is held.
WITH locked AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(%(key)s) AS mine
),
due AS MATERIALIZED (
    SELECT i.id
    FROM job_items i
    WHERE (SELECT mine FROM locked)
      AND i.status = 'PENDING' AND i.in_backoff AND i.run_after <= now()
    ORDER BY i.run_after
    LIMIT %(batch)s
    FOR NO KEY UPDATE SKIP LOCKED
),
promoted AS MATERIALIZED (
    UPDATE job_items i
    SET in_backoff = false
    WHERE i.id = ANY (ARRAY(SELECT id FROM due))
    RETURNING i.id
)
SELECT (SELECT mine FROM locked) AS locked,
    (SELECT count(*) FROM promoted) AS promoted,
    (
        SELECT extract(epoch FROM min(n.run_after) - now())::float8
        FROM job_items n
        WHERE n.status = 'PENDING' AND n.in_backoff AND n.run_after > now()
    ) AS next_due_in;
