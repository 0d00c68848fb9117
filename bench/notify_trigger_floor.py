"""27b. What firing the insert trigger costs at all: `bench.notify_commits`'s pgbench transaction
at 32 clients against variants of `job_items_notify_ready()` swapped in on the `after` schema:
an empty body (the price of any PL/pgSQL statement trigger), the slot lock alone, the row probe
alone, the insert without the lock, the real function, and the trigger disabled. Server CPU a
transaction (`bench.notify_commits.server_cpu`) holds where throughput moves with the machine's
load. Prints its table; writes no result file (not in `run_all`).
"""

from __future__ import annotations

import psycopg

from bench.common import parse_args, table
from bench.db_work import private_server
from bench.notify_commits import (
    NOTIFY_TRIGGER,
    pgbench,
    postmaster_pid,
    schema,
    server_cpu,
    wait_for_clients_gone,
)

CLIENTS = 32
VARIANTS = {
    "empty": "BEGIN RETURN NULL; END;",
    "slot lock only": """BEGIN
        PERFORM pg_advisory_xact_lock_shared(1730027, listener_announce_slot(instance_id))
        FROM (SELECT DISTINCT instance_id FROM ready_items) s;
        RETURN NULL; END;""",
    "row probe only": """BEGIN
        PERFORM 1 FROM ready_items r WHERE NOT EXISTS (
            SELECT 1 FROM announced_stores a
            WHERE a.instance_id = r.instance_id AND a.kind = r.kind);
        RETURN NULL; END;""",
    "insert, no lock": """DECLARE sent bigint; BEGIN
        WITH announced AS (
            INSERT INTO announced_stores (instance_id, kind)
            SELECT DISTINCT instance_id, kind FROM ready_items
            WHERE status = 'PENDING' AND run_after <= now()
            ON CONFLICT DO NOTHING RETURNING instance_id, kind)
        SELECT count(pg_notify('job_items_ready', a.instance_id)::text) INTO sent
        FROM announced a;
        RETURN NULL; END;""",
}


def main() -> None:
    args = parse_args(__doc__)
    rounds, seconds = (1, 4) if args.quick else (3, 6)
    found: dict[str, list[tuple[float, float]]] = {}
    with private_server(max_connections=CLIENTS + 20) as admin:
        url = schema(admin, "after")
        postmaster = postmaster_pid(admin)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT prosrc FROM pg_proc WHERE proname = 'job_items_notify_ready'"
            ).fetchone()
        assert row is not None
        bodies = {**VARIANTS, "the real function": str(row[0]), "disabled": str(row[0])}
        pgbench(url, 8, 3, "on")  # every store announced, the caches warm
        for _ in range(rounds):
            for name, body in bodies.items():
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        "CREATE OR REPLACE FUNCTION job_items_notify_ready() RETURNS trigger"
                        f" LANGUAGE plpgsql AS $body${body}$body$"
                    )
                    if name == "disabled":
                        conn.execute(f"ALTER TABLE job_items DISABLE TRIGGER {NOTIFY_TRIGGER}")
                wait_for_clients_gone(url)
                cpu = server_cpu(postmaster)
                figures = pgbench(url, CLIENTS, seconds, "on")
                wait_for_clients_gone(url)
                used = 1e6 * (server_cpu(postmaster) - cpu) / figures["transactions"]
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"ALTER TABLE job_items ENABLE TRIGGER {NOTIFY_TRIGGER}")
                found.setdefault(name, []).append((figures["tps"], used))
    rows = []
    for name, runs in found.items():
        tps = sum(t for t, _ in runs) / len(runs)
        cpu = sum(c for _, c in runs) / len(runs)
        rows.append([name, f"{tps:,.0f}", f"{cpu:,.0f} µs"])
    title = f"the insert trigger's floor, {CLIENTS} clients ({rounds} round(s), mean)"
    table(title, ["function", "transactions a second", "server CPU a transaction"], rows)


if __name__ == "__main__":
    main()
