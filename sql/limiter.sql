-- The shared rate limiter: one `rate_limiters` row per budget, the arithmetic of
-- listener/gcra.py done on the database's clock. Every statement upserts, so the row is created
-- on first use, and reads clock_timestamp() once (a MATERIALIZED CTE) because its value moves
-- within a statement and the returned slot must be measured against the same instant.
-- Intervals arrive as Python timedeltas: exact microseconds, the resolution of timestamptz.

-- reserve --
-- Slots for a batch of one process's waiters in one short statement. Python plans the batch
-- (gcra.plan_batch: slot i = start + offset i) and sends how far the batch advances each TAT;
-- the database picks the start. %(settle)s carries the token corrections settled since this
-- process's last statement; the start's greatest() already clamps that refund at now.
-- The returned `now` lets the caller sleep (slot - now), immune to clock skew between hosts.
-- Its commit does not wait for the WAL flush: every process's reservations queue on this one
-- row's lock, which a flushed commit holds until the disk answers, so the fleet's grants per
-- second would be bounded by 1 / flush latency (bench.fleet_budget). A crash of the database
-- can lose the last reservations (at most wal_writer_delay x 3 of them); its restart takes
-- longer than those slots lasted, and a 429 would pause the fleet anyway.
WITH c AS MATERIALIZED (
    SELECT clock_timestamp() AS now, set_config('synchronous_commit', 'off', true)
)
INSERT INTO rate_limiters AS r (name, request_tat, token_tat, paused_until, updated_at)
SELECT %(name)s, c.now + %(request_advance)s, c.now + %(token_advance)s, c.now, c.now
FROM c
ON CONFLICT (name) DO UPDATE
SET request_tat = greatest(
        excluded.updated_at, r.request_tat, r.token_tat + %(settle)s, r.paused_until
    ) + %(request_advance)s,
    token_tat = greatest(
        excluded.updated_at, r.request_tat, r.token_tat + %(settle)s, r.paused_until
    ) + %(token_advance)s,
    updated_at = excluded.updated_at
RETURNING r.request_tat - %(request_advance)s AS start, r.updated_at AS now, r.paused_until;

-- pause --
-- Hold every process's next slots until now + duration (never shortening a longer pause); a
-- 429 also counts. The TATs move with it so the slots after the pause are spaced as usual.
WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
INSERT INTO rate_limiters AS r
    (name, request_tat, token_tat, paused_until, rate_limited_total, updated_at)
SELECT %(name)s, c.now + %(duration)s, c.now + %(duration)s, c.now + %(duration)s,
    %(rate_limited)s, c.now
FROM c
ON CONFLICT (name) DO UPDATE
SET paused_until = greatest(r.paused_until, excluded.paused_until),
    request_tat = greatest(r.request_tat, r.paused_until, excluded.paused_until),
    token_tat = greatest(r.token_tat, r.paused_until, excluded.paused_until),
    rate_limited_total = r.rate_limited_total + excluded.rate_limited_total,
    updated_at = excluded.updated_at
RETURNING r.paused_until, r.updated_at AS now, r.rate_limited_total;
