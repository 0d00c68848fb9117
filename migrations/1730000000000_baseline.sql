-- The schema as it stood before the fairness work: stores are known only through their job.
-- up --
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE job_items (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    product_id text,
    status text NOT NULL DEFAULT 'PENDING',
    payload jsonb,
    result jsonb,
    error text,
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    completed_at timestamptz
);

CREATE INDEX idx_job_items_status ON job_items (status);
CREATE INDEX idx_job_items_job_id ON job_items (job_id);
CREATE INDEX idx_job_items_product ON job_items (product_id);

-- down --
DROP TABLE job_items;
DROP TABLE jobs;
