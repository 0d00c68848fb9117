-- Refuse, at insert, the keys the worker cannot carry: a store id is a NOTIFY payload (at most
-- 8000 bytes), a btree key and a word in the operator's log lines (no control characters: a
-- newline would forge a line), a product id a btree key (at most 2704 bytes per entry). A bad
-- row gets an error naming the constraint instead of a failing trigger or index.
-- Added NOT VALID, then validated: the check of existing rows blocks no writer.
-- transaction: off
-- up --
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_instance_id_valid;
ALTER TABLE jobs ADD CONSTRAINT jobs_instance_id_valid
    CHECK (
        btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
        AND instance_id !~ '[[:cntrl:]]'
    ) NOT VALID;
ALTER TABLE jobs VALIDATE CONSTRAINT jobs_instance_id_valid;

ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_instance_id_valid;
ALTER TABLE job_items ADD CONSTRAINT job_items_instance_id_valid
    CHECK (
        btrim(instance_id) <> '' AND octet_length(instance_id) <= 255
        AND instance_id !~ '[[:cntrl:]]'
    ) NOT VALID;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_instance_id_valid;

ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_product_id_length;
ALTER TABLE job_items ADD CONSTRAINT job_items_product_id_length
    CHECK (octet_length(product_id) <= 1024) NOT VALID;
ALTER TABLE job_items VALIDATE CONSTRAINT job_items_product_id_length;

-- down --
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_product_id_length;
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_instance_id_valid;
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_instance_id_valid;
