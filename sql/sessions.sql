-- The dashboard's sessions: the fleet's signing key and the sessions a sign-out ended.

-- insert_key --
-- The first process to ask stores its random key; every later one reads that one.
INSERT INTO dashboard_keys (name, key) VALUES (%(name)s, %(key)s)
ON CONFLICT (name) DO NOTHING;

-- select_key --
SELECT key FROM dashboard_keys WHERE name = %(name)s;

-- revoke --
-- Expired rows go with each sign-out: the table holds at most a day's sign-outs.
WITH expired AS (
    DELETE FROM dashboard_revoked_sessions WHERE expires_at < now()
)
INSERT INTO dashboard_revoked_sessions (nonce, expires_at)
VALUES (%(nonce)s, %(expires_at)s)
ON CONFLICT (nonce) DO NOTHING;

-- is_revoked --
SELECT EXISTS (SELECT 1 FROM dashboard_revoked_sessions WHERE nonce = %(nonce)s) AS revoked;

-- revoked --
-- Every session ended and not yet expired (each process keeps the set in memory).
SELECT nonce, expires_at FROM dashboard_revoked_sessions WHERE expires_at > now();
