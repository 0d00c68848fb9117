-- The job_kinds table: the kinds the fleet's workers serve.

-- register_kinds --
-- A worker's kinds at its start: each one's declared options and budget, the latest worker's
-- word standing (a deploy that changes a kind changes its row).
INSERT INTO job_kinds AS k (name, options, required_options, budget)
SELECT r.name,
    CASE WHEN r.options = '' THEN NULL ELSE string_to_array(r.options, E'\x1f') END,
    CASE WHEN r.required = '' THEN '{}'::text[] ELSE string_to_array(r.required, E'\x1f') END,
    nullif(r.budget, '')
FROM unnest(%(names)s::text[], %(options)s::text[], %(required)s::text[], %(budgets)s::text[])
    AS r(name, options, required, budget)
ON CONFLICT (name) DO UPDATE
SET options = excluded.options,
    required_options = excluded.required_options,
    budget = excluded.budget,
    updated_at = now()
WHERE (k.options, k.required_options, k.budget)
    IS DISTINCT FROM (excluded.options, excluded.required_options, excluded.budget);

-- kind --
SELECT name, options, required_options, budget FROM job_kinds WHERE name = %(name)s;

-- kind_names --
SELECT name FROM job_kinds ORDER BY name;
