-- The dashboard's sessions across processes: the key that signs them when there is no API_TOKEN
-- (one for the fleet, so a session and its CSRF token hold behind a load balancer), and the
-- sessions ended by a sign-out (refused by every process until their cookie expires anyway).
-- up --
CREATE TABLE dashboard_keys (
    name text PRIMARY KEY,
    key bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dashboard_keys_key_length CHECK (octet_length(key) >= 32)
);

CREATE TABLE dashboard_revoked_sessions (
    nonce text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

-- down --
DROP TABLE IF EXISTS dashboard_revoked_sessions;
DROP TABLE IF EXISTS dashboard_keys;
