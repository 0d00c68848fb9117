-- The job_kinds table: the kinds the fleet's workers serve.

-- register_kinds --
-- A worker's kinds at its start: each one's declared options and budget, the latest worker's
-- word standing (a deploy that changes a kind changes its row).
-- Its default tier, whether it can batch and the worker's `auto` rule go with it: producers and
-- the fill trigger resolve tiers from this row.
INSERT INTO job_kinds AS k (
    name, options, required_options, budget, tier, batchable, auto_batch_min_items,
    auto_batch_max_priority
)
SELECT r.name,
    CASE WHEN r.options = '' THEN NULL ELSE string_to_array(r.options, E'\x1f') END,
    CASE WHEN r.required = '' THEN '{}'::text[] ELSE string_to_array(r.required, E'\x1f') END,
    nullif(r.budget, ''), r.tier, r.batchable, %(auto_min_items)s, %(auto_max_priority)s
FROM unnest(
    %(names)s::text[], %(options)s::text[], %(required)s::text[], %(budgets)s::text[],
    %(tiers)s::text[], %(batchable)s::bool[]
) AS r(name, options, required, budget, tier, batchable)
ON CONFLICT (name) DO UPDATE
SET options = excluded.options,
    required_options = excluded.required_options,
    budget = excluded.budget,
    tier = excluded.tier,
    batchable = excluded.batchable,
    auto_batch_min_items = excluded.auto_batch_min_items,
    auto_batch_max_priority = excluded.auto_batch_max_priority,
    updated_at = now()
WHERE (k.options, k.required_options, k.budget, k.tier, k.batchable, k.auto_batch_min_items,
        k.auto_batch_max_priority)
    IS DISTINCT FROM (excluded.options, excluded.required_options, excluded.budget,
        excluded.tier, excluded.batchable, excluded.auto_batch_min_items,
        excluded.auto_batch_max_priority);

-- kind --
SELECT name, options, required_options, budget, tier, batchable, auto_batch_min_items,
    auto_batch_max_priority
FROM job_kinds WHERE name = %(name)s;

-- kind_names --
SELECT name FROM job_kinds ORDER BY name;
