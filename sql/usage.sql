-- What each store's completions used, for its cost: the ledger the trigger job_items_record_usage
-- appends to (store_usage_recent), folded by the compactor into one row per store, day (UTC),
-- model and tier (store_usage_daily). Readers add the two: a row is in one or the other, never
-- both, in any snapshot.

-- compact_usage --
-- One process of the fleet at a time (the lock is tried, never waited for); up to %(rows)s
-- ledger rows a pass, in no particular order (the fold only adds). The delete and the upsert
-- are one statement: a crash loses nothing and counts nothing twice. Writers only append to the
-- ledger, so this never waits on them nor they on it.
WITH locked AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(%(key)s) AS mine
),
moved AS (
    DELETE FROM store_usage_recent
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM store_usage_recent
        WHERE (SELECT mine FROM locked)
        LIMIT %(rows)s
    ))
    RETURNING instance_id, day, model, served_tier, items, prompt_tokens, cached_tokens,
        completion_tokens
),
folded AS (
    INSERT INTO store_usage_daily AS d (
        instance_id, day, model, served_tier, items, prompt_tokens, cached_tokens,
        completion_tokens
    )
    SELECT instance_id, day, model, served_tier, sum(items), sum(prompt_tokens),
        sum(cached_tokens), sum(completion_tokens)
    FROM moved
    GROUP BY instance_id, day, model, served_tier
    ON CONFLICT (instance_id, day, model, served_tier) DO UPDATE
    SET items = d.items + excluded.items,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        cached_tokens = d.cached_tokens + excluded.cached_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens
    RETURNING 1
),
folded_by_month AS (
    INSERT INTO store_usage_monthly AS m (
        instance_id, month, model, served_tier, items, prompt_tokens, cached_tokens,
        completion_tokens
    )
    SELECT instance_id, date_trunc('month', day)::date, model, served_tier, sum(items),
        sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens)
    FROM moved
    GROUP BY instance_id, date_trunc('month', day)::date, model, served_tier
    ON CONFLICT (instance_id, month, model, served_tier) DO UPDATE
    SET items = m.items + excluded.items,
        prompt_tokens = m.prompt_tokens + excluded.prompt_tokens,
        cached_tokens = m.cached_tokens + excluded.cached_tokens,
        completion_tokens = m.completion_tokens + excluded.completion_tokens
    RETURNING 1
)
SELECT (SELECT mine FROM locked) AS locked,
    (SELECT count(*) FROM moved) AS moved,
    (SELECT count(*) FROM folded) + (SELECT count(*) FROM folded_by_month) AS folded;

-- prune_usage --
-- Daily rows older than %(keep_days)s days: the reports read this month and today only.
DELETE FROM store_usage_daily
WHERE day < (now() AT TIME ZONE 'UTC')::date - %(keep_days)s::int;

-- prune_monthly_usage --
DELETE FROM store_usage_monthly
WHERE month < (now() AT TIME ZONE 'UTC')::date - %(keep_days)s::int;

-- store_usage --
-- One store's usage this month (UTC), per model and tier, today's apart: both tables, the
-- month's range of their (instance_id, day) indexes.
WITH bounds AS MATERIALIZED (
    SELECT (now() AT TIME ZONE 'UTC')::date AS today,
        date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month_start
),
rows AS (
    SELECT d.day, d.model, d.served_tier, d.items, d.prompt_tokens, d.cached_tokens,
        d.completion_tokens
    FROM store_usage_daily d, bounds b
    WHERE d.instance_id = %(store)s AND d.day >= b.month_start
    UNION ALL
    SELECT r.day, r.model, r.served_tier, r.items, r.prompt_tokens, r.cached_tokens,
        r.completion_tokens
    FROM store_usage_recent r, bounds b
    WHERE r.instance_id = %(store)s AND r.day >= b.month_start
)
SELECT %(store)s::text AS store, rows.model, rows.served_tier, rows.day = b.today AS today,
    sum(rows.items)::bigint AS items, sum(rows.prompt_tokens)::bigint AS prompt_tokens,
    sum(rows.cached_tokens)::bigint AS cached_tokens,
    sum(rows.completion_tokens)::bigint AS completion_tokens
FROM rows, bounds b
GROUP BY rows.model, rows.served_tier, rows.day = b.today
ORDER BY 2, 3, 4;

-- fleet_usage --
-- Every store's usage this month (UTC), per model and tier, today's apart: today's rows of
-- store_usage_daily, the month's of store_usage_monthly less those (stores x models x tiers
-- rows each, whatever the day of the month), and the ledger not yet folded (a minute of
-- completions, give or take). A row is in the ledger or in both rollups, never in both places.
WITH bounds AS MATERIALIZED (
    SELECT (now() AT TIME ZONE 'UTC')::date AS today,
        date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month_start
),
today AS MATERIALIZED (
    SELECT d.instance_id, d.model, d.served_tier, d.items, d.prompt_tokens, d.cached_tokens,
        d.completion_tokens
    FROM store_usage_daily d, bounds b
    WHERE d.day = b.today
),
rows AS (
    SELECT t.instance_id, t.model, t.served_tier, true AS today, t.items, t.prompt_tokens,
        t.cached_tokens, t.completion_tokens
    FROM today t
    UNION ALL
    SELECT m.instance_id, m.model, m.served_tier, false,
        m.items - coalesce(t.items, 0), m.prompt_tokens - coalesce(t.prompt_tokens, 0),
        m.cached_tokens - coalesce(t.cached_tokens, 0),
        m.completion_tokens - coalesce(t.completion_tokens, 0)
    FROM store_usage_monthly m
    CROSS JOIN bounds b
    LEFT JOIN today t
        ON t.instance_id = m.instance_id AND t.model = m.model
        AND t.served_tier = m.served_tier
    WHERE m.month = b.month_start
    UNION ALL
    SELECT r.instance_id, r.model, r.served_tier, r.day = b.today, r.items, r.prompt_tokens,
        r.cached_tokens, r.completion_tokens
    FROM store_usage_recent r, bounds b
    WHERE r.day >= b.month_start
)
SELECT instance_id AS store, model, served_tier, today,
    sum(items)::bigint AS items, sum(prompt_tokens)::bigint AS prompt_tokens,
    sum(cached_tokens)::bigint AS cached_tokens,
    sum(completion_tokens)::bigint AS completion_tokens
FROM rows
GROUP BY instance_id, model, served_tier, today
HAVING sum(items) > 0
ORDER BY 1, 2, 3, 4;
