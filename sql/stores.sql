-- The operator's store policy (`stores`): what the workers read and `listener store` writes.

-- all_policies --
-- Every store with a row; a store without one has the defaults. Read at each (re)connect and
-- sweep, so a change missed while a listener was away is picked up within one interval.
SELECT instance_id, weight, rpm_limit, max_in_flight, paused FROM stores;

-- policies_of --
-- The rows of the stores named in stores_changed notifications (a missing one: defaults).
SELECT instance_id, weight, rpm_limit, max_in_flight, paused FROM stores
WHERE instance_id = ANY(%(stores)s::text[]);

-- set_policy --
-- One upsert; a field not given (NULL parameter with its `keep_` flag) keeps its value.
INSERT INTO stores AS s (instance_id, weight, rpm_limit, max_in_flight, paused, options)
VALUES (
    %(instance_id)s, coalesce(%(weight)s, 1), %(rpm_limit)s, %(max_in_flight)s,
    coalesce(%(paused)s, false), coalesce(%(options)s::jsonb, '{}'::jsonb)
)
ON CONFLICT (instance_id) DO UPDATE
SET weight = coalesce(%(weight)s, s.weight),
    rpm_limit = CASE WHEN %(keep_rpm_limit)s THEN s.rpm_limit ELSE excluded.rpm_limit END,
    max_in_flight = CASE WHEN %(keep_max_in_flight)s
        THEN s.max_in_flight ELSE excluded.max_in_flight END,
    paused = coalesce(%(paused)s, s.paused),
    options = coalesce(%(options)s::jsonb, s.options),
    updated_at = now()
RETURNING instance_id;

-- show_stores --
-- Each store with a policy row or open items: its policy (defaults when no row), its backlog,
-- its items in flight and the items it started in the last minute. An operator's command: it
-- counts the open items of the stores it shows (the backlog index), and reads the last
-- minute's claims from the rows claimed since then.
WITH named AS (
    SELECT instance_id FROM stores
    WHERE %(instance_id)s::text IS NULL OR instance_id = %(instance_id)s
    UNION
    SELECT DISTINCT instance_id FROM job_items
    WHERE status IN ('PENDING', 'PROCESSING')
      AND (%(instance_id)s::text IS NULL OR instance_id = %(instance_id)s)
    UNION
    SELECT %(instance_id)s::text WHERE %(instance_id)s::text IS NOT NULL
)
SELECT n.instance_id,
    coalesce(s.weight, 1) AS weight,
    s.rpm_limit,
    s.max_in_flight,
    coalesce(s.paused, false) AS paused,
    (SELECT count(*) FROM job_items p
     WHERE p.instance_id = n.instance_id AND p.status = 'PENDING') AS backlog,
    -- As max_in_flight counts them: items held in an OpenAI batch are not in flight here.
    (SELECT count(*) FROM job_items p
     WHERE p.instance_id = n.instance_id AND p.status = 'PROCESSING'
       AND p.openai_batch_id IS NULL) AS in_flight,
    (SELECT count(*) FROM job_items p
     WHERE p.instance_id = n.instance_id AND p.status <> 'PENDING'
       AND p.claimed_at > now() - interval '1 minute') AS last_minute
FROM named n
LEFT JOIN stores s ON s.instance_id = n.instance_id
ORDER BY n.instance_id
LIMIT %(limit)s;
