-- The OpenAI batch path (listener/batches/): collect due batch-tier items into a batch of ours,
-- record each call to OpenAI before and after it, write each output line's outcome. Every step
-- runs under an advisory lock of its own, one process of the fleet at a time, and can run again
-- after a crash at any point.

-- try_lock --
-- Session-level on the step's own connection: held across its calls to OpenAI, released when
-- the step ends or its process dies.
SELECT pg_try_advisory_lock(%(key)s);

-- unlock --
SELECT pg_advisory_unlock(%(key)s);

-- due_by_store --
-- How many due batch-tier items of a kind each store has (at most `cap` counted each), for the
-- collector's round robin; a range of idx_job_items_batch_pending per store.
SELECT s.instance_id, least(count(*), %(cap)s)::int AS due
FROM job_items s
WHERE s.status = 'PENDING' AND s.tier = 'batch' AND s.kind = %(kind)s AND s.run_after <= now()
GROUP BY s.instance_id
ORDER BY s.instance_id;

-- new_batch --
INSERT INTO openai_batches (kind, model) VALUES (%(kind)s, %(model)s) RETURNING id;

-- take_items --
-- The heads of each store's due batch-tier items (`limits` of each), PROCESSING in batch
-- `batch_id` with no lease: the reaper leaves them to the batch path. Their attempt counts now,
-- as a real-time claim's does; a batch that never ran them gives it back.
WITH picked AS (
    SELECT item.id
    FROM unnest(%(stores)s::text[], %(limits)s::int[]) AS req(instance_id, quota)
    CROSS JOIN LATERAL (
        SELECT j.id
        FROM job_items j
        WHERE j.instance_id = req.instance_id
          AND j.status = 'PENDING'
          AND j.tier = 'batch'
          AND j.kind = %(kind)s
          AND j.run_after <= now()
        ORDER BY j.priority DESC, j.run_after, j.id
        LIMIT req.quota
        FOR UPDATE SKIP LOCKED
    ) AS item
)
UPDATE job_items j
SET status = 'PROCESSING',
    claimed_at = now(),
    claimed_by = 'batch:' || %(batch_id)s::text,
    lease_expires_at = NULL,
    openai_batch_id = %(batch_id)s,
    attempts = j.attempts + 1,
    updated_at = now()
WHERE j.id = ANY (ARRAY(SELECT id FROM picked));

-- count_taken --
UPDATE openai_batches b
SET request_count = (
    SELECT count(*) FROM job_items i
    WHERE i.openai_batch_id = b.id AND i.status = 'PROCESSING'
)
WHERE b.id = %(batch_id)s
RETURNING b.request_count;

-- drop_batch --
DELETE FROM openai_batches WHERE id = %(batch_id)s AND state = 'collected';

-- open_batches --
SELECT id, kind, model, state, input_file_id, openai_batch_id, status, request_count,
    completed_count, failed_count, estimated_tokens, output_file_id, error_file_id, outcome,
    last_error, created_at, submitted_at
FROM openai_batches
WHERE state <> 'finished' AND state = ANY (%(states)s::text[])
ORDER BY id;

-- batch_items --
-- The items batch `batch_id` still holds, as the claim returns them (payload as text, options
-- over the store's), in id order: the input file's lines, or the outcomes' items.
SELECT i.id, i.job_id, i.instance_id, i.product_id,
    CASE WHEN octet_length(i.payload::text) <= %(max_payload_bytes)s
        THEN i.payload::text END AS payload_text,
    octet_length(i.payload::text) AS payload_bytes,
    i.attempts, i.kind,
    (coalesce((SELECT s.options FROM stores s WHERE s.instance_id = i.instance_id), '{}'::jsonb)
        || (SELECT job.options FROM jobs job WHERE job.id = i.job_id))::text AS options
FROM job_items i
WHERE i.openai_batch_id = %(batch_id)s AND i.status = 'PROCESSING'
  AND i.claimed_by = 'batch:' || %(batch_id)s::text
ORDER BY i.id;

-- still_wanted --
-- Items of the batch not cancelled: none, and the batch itself is cancelled at OpenAI.
SELECT count(*) FROM job_items
WHERE openai_batch_id = %(batch_id)s AND status = 'PROCESSING';

-- mark_uploaded --
UPDATE openai_batches
SET state = 'uploaded', input_file_id = %(file_id)s, request_count = %(requests)s,
    estimated_tokens = %(tokens)s, uploaded_at = now()
WHERE id = %(batch_id)s AND state = 'collected';

-- enqueued_tokens --
-- What our submitted batches of this model hold at OpenAI now (the enqueued-token limit's).
SELECT coalesce(sum(estimated_tokens), 0)::bigint FROM openai_batches
WHERE state IN ('submitting', 'submitted') AND model = %(model)s AND id <> %(batch_id)s;

-- mark_submitting --
-- Before batches.create: a restart finds the row here and looks for the batch at OpenAI (by its
-- metadata) before it creates one.
UPDATE openai_batches SET state = 'submitting'
WHERE id = %(batch_id)s AND state IN ('uploaded', 'submitting');

-- mark_submitted --
UPDATE openai_batches
SET state = 'submitted', openai_batch_id = %(openai_batch_id)s, status = %(status)s,
    submitted_at = coalesce(submitted_at, now()), polled_at = now()
WHERE id = %(batch_id)s AND state = 'submitting';

-- record_poll --
UPDATE openai_batches
SET status = %(status)s, completed_count = %(completed)s, failed_count = %(failed)s,
    output_file_id = %(output_file_id)s, error_file_id = %(error_file_id)s,
    last_error = coalesce(%(last_error)s, last_error), polled_at = now()
WHERE id = %(batch_id)s;

-- mark_finished --
-- The last step: every item was written or returned first (its outcomes' transactions).
UPDATE openai_batches
SET state = 'finished', outcome = %(outcome)s, last_error = coalesce(%(last_error)s, last_error),
    finished_at = now()
WHERE id = %(batch_id)s AND state <> 'finished';

-- record_usage --
-- Before their outcomes are written (still PROCESSING, so the usage ledger's trigger counts them
-- once, when they become COMPLETED): what each line's call cost and which model and tier served
-- it.
UPDATE job_items j
SET usage = u.usage, model = u.model, served_tier = 'batch'
FROM unnest(%(ids)s::bigint[], %(usages)s::jsonb[], %(models)s::text[]) AS u(id, usage, model)
WHERE j.id = u.id AND j.status = 'PROCESSING'
  AND j.claimed_by = 'batch:' || %(batch_id)s::text;

-- batch_state_of_items --
-- For "why waiting": the batch each of these PROCESSING items is in.
SELECT i.id, b.id, b.openai_batch_id, b.state, b.status, b.submitted_at, b.created_at
FROM job_items i
JOIN openai_batches b ON b.id = i.openai_batch_id
WHERE i.id = ANY (%(ids)s::bigint[]) AND i.status = 'PROCESSING';
