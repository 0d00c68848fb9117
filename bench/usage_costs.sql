-- The fleet's month as the first cut read it: every daily row of the month (stores x days x
-- models x tiers), for bench.usage_costs to time beside sql/usage.sql's fleet_usage, which reads
-- the monthly rollup instead.

-- fleet_usage_from_daily --
-- Every store's usage this month (UTC), per model and tier, today's apart: the month's range
-- of store_usage_daily (idx_store_usage_daily_day: stores x days x models x tiers rows, never
-- the items) and the ledger not yet folded (a minute of completions, give or take).
WITH bounds AS MATERIALIZED (
    SELECT (now() AT TIME ZONE 'UTC')::date AS today,
        date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month_start
),
rows AS (
    SELECT d.instance_id, d.day, d.model, d.served_tier, d.items, d.prompt_tokens,
        d.cached_tokens, d.completion_tokens
    FROM store_usage_daily d, bounds b
    WHERE d.day >= b.month_start
    UNION ALL
    SELECT r.instance_id, r.day, r.model, r.served_tier, r.items, r.prompt_tokens,
        r.cached_tokens, r.completion_tokens
    FROM store_usage_recent r, bounds b
    WHERE r.day >= b.month_start
)
SELECT rows.instance_id AS store, rows.model, rows.served_tier, rows.day = b.today AS today,
    sum(rows.items)::bigint AS items, sum(rows.prompt_tokens)::bigint AS prompt_tokens,
    sum(rows.cached_tokens)::bigint AS cached_tokens,
    sum(rows.completion_tokens)::bigint AS completion_tokens
FROM rows, bounds b
GROUP BY rows.instance_id, rows.model, rows.served_tier, rows.day = b.today
ORDER BY 1, 2, 3, 4;
