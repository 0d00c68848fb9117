"""`listener doctor` against real databases, healthy and broken on purpose (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from listener.doctor import run_checks
from listener.doctor.context import Context, connect_read_only
from listener.doctor.fleet import check_listen
from listener.doctor.report import Check, Status, exit_code, ok, warn
from listener.settings import Settings
from listener.sqlfiles import queries
from listener.stub.server import StubConfig, run_stub
from tests.conftest import Server
from tests.support import (
    insert_job,
    insert_job_blocking,
    make_settings,
    run_listener,
    running_worker,
    wait_for_counts,
    wait_until,
)

OFFLINE = "http://127.0.0.1:9"  # no worker runs in most tests: the OpenAI side is never called


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def execute(conninfo: str, *statements: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def doctor(conninfo: str, settings: Settings | None = None, **options: Any) -> dict[str, Check]:
    options.setdefault("schema_diff", False)
    return by_name(run_checks(conninfo, settings or make_settings(OFFLINE), **options))


def live_heartbeats(conninfo: str) -> bool:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT count(*) FROM worker_heartbeats").fetchone()
    return bool(row and row[0])


@pytest.mark.anyio
async def test_a_healthy_deployment_passes_every_check(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=6000, rate_limit_tpm=10_000_000)
        async with running_worker(database_url, settings):
            await insert_job(database_url, "store-A", 5)
            await wait_until(lambda: live_heartbeats(database_url))
            await wait_for_counts(database_url, lambda counts: counts.get("COMPLETED") == 5)
            # A backlog for the claim's plan, in backoff from its insert on (inserted then
            # updated, the running worker could take one in between).
            execute(
                database_url,
                "WITH job AS (INSERT INTO jobs (instance_id) VALUES ('store-B') RETURNING id)"
                " INSERT INTO job_items (job_id, instance_id, product_id, payload, run_after)"
                " SELECT job.id, 'store-B', 'p' || n, '{\"name\": \"x\"}',"
                " now() + interval '1 hour' FROM job, generate_series(1, 3) AS n",
            )
            checks = await anyio.to_thread.run_sync(
                lambda: run_checks(database_url, settings, schema_diff=True)
            )
    report = by_name(checks)
    assert {c.name: c.status for c in checks if c.status is not Status.OK} == {}, [
        (c.name, c.summary) for c in checks if c.status is not Status.OK
    ]
    assert exit_code(checks) == 0
    assert "equal to sql/schema.sql" in report["schema"].summary
    assert report["backlog"].data["pending"] == 3
    assert report["backlog"].data["in_backoff"] == 3
    assert report["workers"].data["live"] == 1
    assert report["listen"].data["delivered"] is True
    assert "idx_job_items" in report["claim plan"].summary


def test_a_missing_index_fails_with_how_to_create_it(database_url: str) -> None:
    execute(database_url, "DROP INDEX idx_job_items_product")
    check = doctor(database_url)["indexes"]
    assert check.status is Status.FAIL
    assert "1 missing (idx_job_items_product)" in check.summary
    assert any(
        "CREATE INDEX CONCURRENTLY idx_job_items_product ON job_items (product_id);" in line
        for line in check.lines
    )


def test_an_invalid_index_left_by_an_interrupted_concurrent_build_fails(
    database_url: str,
) -> None:
    insert_job_blocking(database_url, "store-A", 3)
    # A real failed CREATE INDEX CONCURRENTLY: the duplicates abort it after the catalog entry
    # is made, leaving the INVALID index that `\di` still lists.
    execute(database_url, "DROP INDEX idx_job_items_status_id")
    with pytest.raises(psycopg.errors.UniqueViolation):
        execute(
            database_url,
            "CREATE UNIQUE INDEX CONCURRENTLY idx_job_items_status_id ON job_items (status)",
        )
    check = doctor(database_url)["indexes"]
    assert check.status is Status.FAIL
    assert "1 INVALID (idx_job_items_status_id)" in check.summary
    assert "interrupted CREATE INDEX CONCURRENTLY" in check.remedy
    assert any("REINDEX INDEX CONCURRENTLY idx_job_items_status_id" in ln for ln in check.lines)


def test_statistics_far_below_the_rows_warn_until_analyzed(database_url: str) -> None:
    execute(
        database_url,
        "ANALYZE job_items",
        "WITH job AS (INSERT INTO jobs (instance_id) VALUES ('store-A') RETURNING id)"
        " INSERT INTO job_items (job_id, instance_id, product_id, payload)"
        " SELECT job.id, 'store-A', 'p' || n, '{}' FROM job, generate_series(1, 2000) AS n",
        "SELECT pg_stat_force_next_flush()",
    )
    check = doctor(database_url)["statistics"]
    assert check.status is Status.WARN
    assert check.summary == "job_items: statistics count 0 rows, 2,000 live"
    execute(database_url, "ANALYZE job_items")
    check = doctor(database_url)["statistics"]
    assert check.status is Status.OK
    assert check.data["job_items"] == {"estimated_rows": 2000, "live_rows": 2000}


def test_null_instance_ids_without_the_constraint_fail(database_url: str) -> None:
    insert_job_blocking(database_url, "store-A", 3)
    execute(
        database_url,
        "ALTER TABLE job_items ALTER COLUMN instance_id DROP NOT NULL",
        "UPDATE job_items SET instance_id = NULL WHERE id IN (SELECT id FROM job_items LIMIT 2)",
    )
    report = doctor(database_url)
    assert report["instance_id"].status is Status.FAIL
    assert "may be NULL: no NOT NULL, no validated CHECK" in report["instance_id"].summary
    assert report["instance_id nulls"].status is Status.FAIL
    assert report["instance_id nulls"].summary.startswith("2 item(s) with a NULL instance_id")


def test_a_validated_check_stands_in_for_not_null(database_url: str) -> None:
    execute(
        database_url,
        "ALTER TABLE job_items ALTER COLUMN instance_id DROP NOT NULL",
        "ALTER TABLE job_items ADD CONSTRAINT iid_not_null CHECK (instance_id IS NOT NULL)",
    )
    report = doctor(database_url)
    assert report["instance_id"].status is Status.OK
    assert "validated CHECK iid_not_null" in report["instance_id"].summary


def test_a_pool_too_large_for_max_connections_fails(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    assert row is not None
    settings = make_settings(OFFLINE, db_pool_max=int(row[0]))
    report = doctor(database_url, settings, processes=2)
    connections = report["connections"]
    assert connections.status is Status.FAIL
    assert f"2 worker(s) (--processes) × (DB_POOL_MAX {row[0]} + 1)" in connections.lines[0]
    assert "lower DB_POOL_MAX to" in connections.remedy
    assert report["settings"].status is Status.FAIL
    assert "exceeds what the database allows" in report["settings"].summary


def test_under_twenty_percent_headroom_warns(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
        ).fetchone()
    assert row is not None
    usable = int(row[0])
    # 1 process × (pool + 1) + 1 api × pool + 1 = 2 × pool + 2, at ~90 % of what is usable.
    pool = (usable * 9 // 10 - 2) // 2
    check = doctor(database_url, make_settings(OFFLINE, db_pool_max=pool), processes=1)
    assert check["connections"].status is Status.WARN, check["connections"].summary
    assert "under 20 % headroom" in check["connections"].remedy


def test_no_live_worker_fails(database_url: str) -> None:
    check = doctor(database_url)["workers"]
    assert check.status is Status.FAIL
    assert check.summary.startswith("no live worker (no heartbeat ever)")


def test_items_whose_worker_died_holding_them_fail(database_url: str) -> None:
    insert_job_blocking(database_url, "store-A", 4)
    settings = make_settings(OFFLINE, lease_seconds=2)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The worker's own claim, then its death: its heartbeat stops, its leases run out.
        claimed = conn.execute(
            queries("items")["claim"],
            {
                "stores": ["store-A"],
                "limits": [4],
                "worker_id": "dead-worker",
                "lease_seconds": 2,
                "max_payload_bytes": 65536,
                "announce": False,
                "kinds": ["product_description"],
                "lane": "openai",
            },
        ).fetchall()
        assert len(claimed) == 4
        conn.execute(
            "INSERT INTO worker_heartbeats (worker_id, hostname, pid, seen_at)"
            " VALUES ('dead-worker', 'gone', 1, now() - interval '10 minutes')"
        )
        conn.execute(
            "UPDATE job_items SET lease_expires_at = now() - interval '5 minutes'"
            " WHERE claimed_by = 'dead-worker'"
        )
    report = doctor(database_url, settings)
    leases = report["leases"]
    assert leases.status is Status.FAIL
    assert leases.summary.startswith("4 PROCESSING item(s) with an expired lease, the oldest 5")
    assert "dead-worker" in leases.summary
    assert "no live worker reaps them" in leases.remedy
    assert report["workers"].summary.startswith("no live worker (last heartbeat 10 min ago)")


def test_listen_not_delivered_fails(database_url: str, empty_database_url: str) -> None:
    """The listening session is on another database of the same server: the notification is
    really sent and really not delivered to it (NOTIFY reaches one database's sessions only),
    which is what a listener behind a transaction-mode pooler sees."""
    with connect_read_only(database_url) as conn:
        ctx = Context(conn, database_url, make_settings(OFFLINE))
        check = check_listen(ctx, listen_conninfo=empty_database_url)
    assert check.status is Status.FAIL
    assert check.summary.startswith("a probe notification did not arrive within 1s")
    assert "transaction-mode PgBouncer" in check.summary
    assert "point DATABASE_URL at PostgreSQL directly" in check.remedy


@pytest.fixture
def pgbouncer(pg_server: Server, database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real PgBouncer in transaction mode in front of the test's database; skipped where
    PgBouncer is not installed (`apt-get install pgbouncer`)."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None or pg_server.host.startswith("/"):
        pytest.skip("pgbouncer is not installed (or the server has no TCP port)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "users.txt").write_text(f'"{pg_server.user}" ""\n')
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={pg_server.host} port={pg_server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\npool_mode = transaction\n"
        # It refuses to run as root: it drops to the database's system user instead.
        + ("user = postgres\n" if os.geteuid() == 0 else "")
    )
    for path in (tmp_path, config, tmp_path / "users.txt"):
        path.chmod(0o755)
    url = make_conninfo(database_url, host="127.0.0.1", port=port)
    proc = subprocess.Popen([binary, str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(url, connect_timeout=1).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling the pooler's readiness: it announces nothing else
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_transaction_mode_pgbouncer_in_front_fails_listen(pgbouncer: str) -> None:
    report = doctor(pgbouncer)
    listen = report["listen"]
    assert listen.status is Status.FAIL
    assert "did not arrive within 1s" in listen.summary or "pooler" in listen.summary
    assert "PgBouncer" in listen.summary
    assert f"port {listen.data['client_port']} forwards to PostgreSQL's" in listen.summary
    # Every other check still reads the database through the pooler.
    assert report["indexes"].status is Status.OK
    assert report["migrations"].status is Status.OK


def test_unknown_and_pending_migrations_fail(database_url: str) -> None:
    execute(database_url, "INSERT INTO schema_migrations (name) VALUES ('1999999999999_future')")
    check = doctor(database_url)["migrations"]
    assert check.status is Status.FAIL
    assert "unknown to this release: 1999999999999_future" in check.summary
    execute(
        database_url,
        "DELETE FROM schema_migrations WHERE name <> '1730000000000_baseline'",
    )
    check = doctor(database_url)["migrations"]
    assert check.status is Status.FAIL
    assert "pending" in check.summary and "run `listener migrate up`" in check.remedy


def test_a_schema_that_drifted_fails_the_schema_check(database_url: str) -> None:
    execute(database_url, "ALTER TABLE jobs ADD COLUMN hand_made text")
    check = doctor(database_url, schema_diff=True)["schema"]
    assert check.status is Status.FAIL
    assert any("hand_made" in line for line in check.lines)


def test_the_doctor_session_cannot_write(database_url: str) -> None:
    with (
        connect_read_only(database_url) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("DELETE FROM job_items")


def test_warnings_alone_exit_zero() -> None:
    assert exit_code([ok("a", "fine"), warn("b", "hm", "look")]) == 0


def test_cli_json_and_exit_code(database_url: str, pg_server: Server) -> None:
    result = run_listener("doctor", "--json", "--no-schema-diff", DATABASE_URL=database_url)
    assert result.returncode == 1, result.stderr  # no live worker
    report = json.loads(result.stdout)
    assert report["status"] == "fail"
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["workers"] == "fail"
    assert statuses["indexes"] == "ok"
    assert statuses["listen"] == "ok"
    text = run_listener("doctor", "--no-schema-diff", DATABASE_URL=database_url)
    assert "✗ workers" in text.stdout and "✓ indexes" in text.stdout
    assert text.stdout.rstrip().splitlines()[-1].endswith("s")
    unreachable = make_conninfo(pg_server.conninfo("postgres"), dbname="no_such_database_h2")
    gone = run_listener("doctor", DATABASE_URL=unreachable)
    assert gone.returncode == 3  # the database cannot be reached: not a failed check
    assert gone.stderr.startswith("listener: cannot connect to the database:")
    assert len(gone.stderr.strip().splitlines()) == 1


def add_heartbeat(conninfo: str, worker: str, connected: bool, stats: dict[str, Any]) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO worker_heartbeats (worker_id, hostname, pid, listener_connected, stats)"
            " VALUES (%s, 'host', 1, %s, %s::jsonb)",
            (worker, connected, json.dumps(stats)),
        )


def test_a_worker_whose_listener_is_down_fails_and_pool_waiting_warns(database_url: str) -> None:
    pool = {"total": 4, "idle": 0, "waiting": 3, "max": 4}
    add_heartbeat(database_url, "starved", True, {"pool": pool})
    check = doctor(database_url)["workers"]
    assert check.status is Status.WARN
    assert "pool waiting > 0 on starved" in check.summary
    assert "increase DB_POOL_MAX" in check.remedy
    assert "starved: beat" in check.lines[0] and "waiting 3" in check.lines[0]
    add_heartbeat(database_url, "deaf", False, {})
    check = doctor(database_url)["workers"]
    assert check.status is Status.FAIL
    assert check.summary.startswith("2 live") and "listener disconnected on deaf" in check.summary


def test_a_pause_after_a_429_warns_with_the_use_of_the_budget(database_url: str) -> None:
    add_heartbeat(
        database_url, "w1", True, {"requestsInLastMinute": 400, "rpm": 450, "tpm": 200_000}
    )
    execute(
        database_url,
        "INSERT INTO rate_limiters (name, paused_until, rate_limited_total)"
        " VALUES ('openai', now() + interval '30 seconds', 7)",
    )
    settings = make_settings(OFFLINE, rate_limit_rpm=450, rate_limit_tpm=200_000)
    check = doctor(database_url, settings)["budget"]
    assert check.status is Status.WARN
    assert check.summary.startswith("400/450 RPM (89%), 0/200,000 TPM (0%)")
    assert "7 in all" in check.summary
    assert "paused for" in check.summary


def test_risky_settings_warn_and_secrets_stay_masked(database_url: str) -> None:
    settings = make_settings(
        OFFLINE,
        http_host="0.0.0.0",
        rate_limit_rpm=60,
        worker_concurrency=500,
        openai_timeout_seconds=5,
    )
    check = doctor(database_url, settings, processes=1)["settings"]
    assert check.status is Status.WARN
    assert "HTTP_HOST 0.0.0.0 serves the stats to other machines without API_TOKEN" in check.summary
    assert "WORKER_CONCURRENCY 500 × 1 process(es) = 500 in flight" in check.summary
    assert "OPENAI_API_KEY=***" in check.data["settings"]
    assert "test-key" not in json.dumps(check.data) + "".join(check.lines)


def test_items_past_their_backoff_that_nobody_promotes_fail(database_url: str) -> None:
    assert doctor(database_url)["backoff"].status is Status.OK
    insert_job_blocking(database_url, "store-A", 3)
    # In backoff, due two minutes ago, and no worker to promote them.
    execute(
        database_url,
        "UPDATE job_items SET in_backoff = true, run_after = now() - interval '2 minutes'",
    )
    check = doctor(database_url, make_settings(OFFLINE, sweep_interval_seconds=30))["backoff"]
    assert check.status is Status.FAIL
    assert check.summary.startswith("3 item(s) past their backoff still out of the claims")
    assert "no live worker promotes them" in check.remedy
