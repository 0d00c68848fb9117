"""The schema and its migrations, against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from listener.errors import MigrationError
from listener.migrate import MigrationRunner, check_migrations, diff_against_schema, load_migrations
from listener.sqlfiles import queries
from tests.support import (
    query_blocking,
    run_listener,
)

ROOT = Path(__file__).resolve().parent.parent


def test_up_from_empty_then_up_is_a_no_op(empty_database_url: str) -> None:
    lines: list[str] = []
    runner = MigrationRunner(empty_database_url, output=lines.append)
    applied = runner.up()
    assert applied == [m.name for m in load_migrations()]
    assert "Adding instance_id column to job_items..." in lines
    assert "✓ Migration completed: instance_id added to job_items" in lines
    assert runner.up() == []
    with psycopg.connect(empty_database_url) as conn:
        column = conn.execute(
            "SELECT data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'job_items' AND column_name = 'instance_id'"
        ).fetchone()
        indexes = {
            r[0]
            for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'job_items'")
        }
    assert column == ("text", "NO")
    assert {
        "idx_job_items_instance_status_id",
        "idx_job_items_status_id",
        "idx_job_items_status",
        "idx_job_items_job_id",
        "idx_job_items_product",
        "idx_job_items_pending",
    } <= indexes


def test_status_lists_each_migration(empty_database_url: str) -> None:
    migrations = load_migrations()
    MigrationRunner(empty_database_url, migrations=migrations[:2], output=lambda _l: None).up()
    lines: list[str] = []
    MigrationRunner(empty_database_url, output=lines.append).status()
    assert lines[0] == "1730000000000_baseline.sql [COMPLETED]"
    assert lines[1] == "1730000012000_add-instance-id-to-job-items.sql [COMPLETED]"
    assert lines[2] == "1730000013000_leases-retries-and-notify.sql [PENDING]"
    assert len(lines) == len(migrations)


def test_legacy_database_upgrade_backfills_every_item(empty_database_url: str) -> None:
    migrations = load_migrations()
    MigrationRunner(empty_database_url, migrations=migrations[:1], output=lambda _l: None).up()
    with psycopg.connect(empty_database_url) as conn:
        # 1,000 jobs over 250 stores, 100 items each: the legacy shape, no instance_id on items.
        conn.execute(
            "INSERT INTO jobs (instance_id)"
            " SELECT 'store-' || (n % 250) FROM generate_series(1, 1000) n"
        )
        conn.execute(
            "INSERT INTO job_items (job_id, product_id, payload)"
            " SELECT j.id, 'p' || n, jsonb_build_object('name', 'Product ' || n)"
            " FROM jobs j CROSS JOIN generate_series(1, 100) n"
        )
    lines: list[str] = []
    MigrationRunner(empty_database_url, output=lines.append).up()
    assert lines.index("Adding instance_id column to job_items...") < lines.index(
        "✓ Migration completed: instance_id added to job_items"
    )
    assert any("backfilled 100 percent of 100000 row(s)" in line for line in lines)
    with psycopg.connect(empty_database_url) as conn:
        total, missing, wrong = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE i.instance_id IS NULL),"
            " count(*) FILTER (WHERE i.instance_id IS DISTINCT FROM j.instance_id)"
            " FROM job_items i JOIN jobs j ON j.id = i.job_id"
        ).fetchone() or (0, 0, 0)
        assert (total, missing, wrong) == (100_000, 0, 0)
        # An old client that does not know instance_id still inserts valid items.
        conn.execute("INSERT INTO job_items (job_id, product_id) VALUES (1, 'late')")
        late = conn.execute(
            "SELECT instance_id FROM job_items WHERE product_id = 'late'"
        ).fetchone()
        assert late == ("store-1",)


def test_down_then_up_round_trips(database_url: str) -> None:
    runner = MigrationRunner(database_url, output=lambda _l: None)
    count = len(load_migrations())
    assert len(runner.down(count)) == count
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        ).fetchone()
    assert tables == (0,)
    runner.up()
    assert diff_against_schema(database_url) == ""


def test_down_one_reverts_only_the_last(database_url: str) -> None:
    runner = MigrationRunner(database_url, output=lambda _l: None)
    assert runner.down() == [load_migrations()[-1].name]
    diff = diff_against_schema(database_url)
    assert "announced_stores" in diff  # the last migration's table
    assert "store_usage_daily" not in diff and "listener_item_tier" not in diff
    assert "listener_end_finished_jobs" not in diff
    assert "idx_jobs_finished" not in diff
    assert "dashboard_revoked_sessions" not in diff
    assert "idx_job_items_backoff" not in diff and "job_items_mark_backoff" not in diff


def test_check_is_clean_and_sees_a_missing_migration(database_url: str) -> None:
    assert check_migrations(database_url) == ""
    # Everything before the claim indexes and the input limits: later migrations do not move it.
    before = [m for m in load_migrations() if m.name < "1730000014000"]
    incomplete = check_migrations(database_url, migrations=before)
    assert "idx_job_items_pending" in incomplete
    assert "job_items_instance_id_valid" in incomplete
    assert '"public"."stores"' in incomplete


def test_failing_migration_rolls_back_and_names_file_and_statement(
    database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "1790000000000_bad.sql"
    bad.write_text(
        "-- up --\nCREATE TABLE half_done (id int);\nALTER TABLE no_such_table ADD COLUMN x int;\n"
        "-- down --\nDROP TABLE half_done;\n"
    )
    runner = MigrationRunner(
        database_url,
        output=lambda _l: None,
        migrations=load_migrations() + load_migrations(tmp_path),
    )
    with pytest.raises(MigrationError) as raised:
        runner.up()
    message = str(raised.value)
    assert "1790000000000_bad.sql" in message
    assert "ALTER TABLE no_such_table ADD COLUMN x int" in message
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM schema_migrations WHERE name = '1790000000000_bad'"
        ).fetchone() == (0,)


def test_two_concurrent_up_processes_apply_each_migration_once(empty_database_url: str) -> None:
    env = {"DATABASE_URL": empty_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "listener", "migrate", "up"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    combined = "".join(out for out, _err in outputs)
    for migration in load_migrations():
        assert combined.count(f"applying {migration.name}\n") == 1
    assert combined.count("nothing to apply") == 1


def test_cli_status_and_check(database_url: str) -> None:
    status = run_listener("migrate", "status", DATABASE_URL=database_url)
    assert status.returncode == 0, status.stderr
    assert "1730000012000_add-instance-id-to-job-items.sql [COMPLETED]" in status.stdout
    check = run_listener("migrate", "check", DATABASE_URL=database_url)
    assert check.returncode == 0, check.stdout + check.stderr
    diff = run_listener("migrate", "diff", DATABASE_URL=database_url)
    assert "matches sql/schema.sql" in diff.stdout


def test_store_lookup_uses_the_pending_index_at_100k_rows(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO jobs (instance_id) SELECT 'store-' || n FROM generate_series(1, 100) n"
        )
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " SELECT j.id, j.instance_id, 'p' || n, '{}'::jsonb"
            " FROM jobs j CROSS JOIN generate_series(1, 1000) n"
        )
        conn.execute("ANALYZE job_items")
        plan = conn.execute(
            b"EXPLAIN (FORMAT JSON) " + queries("items")["store_next_items"].encode(),
            {"instance_id": "store-7", "quota": 20},
        ).fetchone()
    assert plan is not None
    text = json.dumps(plan[0])
    assert '"Index Name": "idx_job_items_pending"' in text
    assert "Seq Scan" not in text and '"Sort"' not in text


def test_up_plan_prints_each_statement_and_its_locks_and_applies_nothing(
    empty_database_url: str,
) -> None:
    MigrationRunner(
        empty_database_url, output=lambda _line: None, migrations=load_migrations()[:1]
    ).up()
    plan = run_listener("migrate", "up", "--plan", DATABASE_URL=empty_database_url)
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout
    assert out.startswith(f"{len(load_migrations()) - 1} pending migration(s)")
    # A transactional ALTER TABLE: ACCESS EXCLUSIVE on job_items, held until the commit.
    leases = out[out.index("1730000013000_leases-retries-and-notify.sql (one transaction") :]
    assert "job_items: AccessExclusiveLock ✗ blocks every claim" in leases
    assert "→ ACCESS EXCLUSIVE on job_items until the migration commits" in leases
    # A concurrent index build, watched while it ran outside a transaction.
    indexes = out[out.index("1730000014000_claim-indexes.sql (outside a transaction") :]
    build = indexes[indexes.index("CREATE INDEX CONCURRENTLY idx_job_items_pending") :]
    assert (
        build.splitlines()[1]
        .strip()
        .startswith("job_items: ShareUpdateExclusiveLock   claims and completions go on")
    )
    # Nothing was applied to the database itself.
    applied = query_blocking(empty_database_url, "SELECT name FROM schema_migrations")
    assert applied == [("1730000000000_baseline",)]
    assert query_blocking(empty_database_url, "SELECT to_regclass('rate_limiters')") == [(None,)]
    status = run_listener("migrate", "status", "-v", DATABASE_URL=empty_database_url)
    assert "1730000013000_leases-retries-and-notify.sql [PENDING]" in status.stdout
    assert "job_items: AccessExclusiveLock" in status.stdout


def test_up_plan_with_nothing_pending(database_url: str) -> None:
    plan = run_listener("migrate", "up", "--plan", DATABASE_URL=database_url)
    assert plan.stdout.strip() == "nothing to apply: the database is up to date"


def test_store_policy_migrations_keep_every_item_and_go_down_cleanly(
    empty_database_url: str,
) -> None:
    migrations = load_migrations()
    policy = [m.name for m in migrations].index("1730000016000_store-policy")
    before = MigrationRunner(
        empty_database_url, migrations=migrations[:policy], output=lambda _l: None
    )
    before.up()
    with psycopg.connect(empty_database_url) as conn:
        conn.execute(
            "INSERT INTO jobs (instance_id) SELECT 'store-' || n FROM generate_series(1, 20) n"
        )
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " SELECT j.id, j.instance_id, 'p' || n, '{}'::jsonb"
            " FROM jobs j CROSS JOIN generate_series(1, 500) n"
        )
    runner = MigrationRunner(empty_database_url, output=lambda _l: None)
    assert runner.up() == [m.name for m in migrations[policy:]]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        # Old rows read priority 0 from the catalog (no rewrite); the table's constraints hold.
        assert conn.execute(
            "SELECT count(*), min(priority), max(priority) FROM job_items"
        ).fetchone() == (10_000, 0, 0)
        validated = conn.execute(
            "SELECT conname, convalidated FROM pg_constraint"
            " WHERE conname IN ('jobs_priority_range', 'job_items_priority_range')"
            " ORDER BY conname"
        ).fetchall()
        assert validated == [("job_items_priority_range", True), ("jobs_priority_range", True)]
        # A producer that leaves the priority out gets its job's.
        job = conn.execute(
            "INSERT INTO jobs (instance_id, priority) VALUES ('x', 7) RETURNING id"
        ).fetchone()
        assert job is not None
        conn.execute("INSERT INTO job_items (job_id, instance_id) VALUES (%s, 'x')", job)
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, priority) VALUES (%s, 'x', -2)", job
        )
        assert conn.execute(
            "SELECT priority FROM job_items WHERE instance_id = 'x' ORDER BY id"
        ).fetchall() == [(7,), (-2,)]
        conn.execute("INSERT INTO stores (instance_id, weight) VALUES ('store-1', 4)")
    # Down to before the store policy (the migrations after it first).
    later = len(migrations) - policy
    assert len(runner.down(later)) == later
    with psycopg.connect(empty_database_url) as conn:
        columns = conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE column_name = 'priority'"
        ).fetchall()
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename IN ('stores', 'store_throttles')"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM job_items").fetchone() == (10_002,)
        index = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_job_items_pending'"
        ).fetchone()
    assert columns == [] and tables == []
    assert index is not None and "(instance_id, id) WHERE" in index[0]
    runner.up()
    assert diff_against_schema(empty_database_url) == ""


def test_the_backoff_migration_flags_the_items_in_backoff_now(empty_database_url: str) -> None:
    migrations = load_migrations()
    backoff = [m.name for m in migrations].index("1730000026000_pending-backoff")
    MigrationRunner(
        empty_database_url, migrations=migrations[:backoff], output=lambda _l: None
    ).up()
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO jobs (instance_id) VALUES ('store-1')")
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, status, run_after)"
            " VALUES (1, 'store-1', 'due', 'PENDING', now()),"
            " (1, 'store-1', 'retry', 'PENDING', now() + interval '1 hour'),"
            " (1, 'store-1', 'running', 'PROCESSING', now() + interval '1 hour'),"
            " (1, 'store-1', 'failed', 'FAILED', now() + interval '1 hour')"
        )
    runner = MigrationRunner(empty_database_url, output=lambda _l: None)
    assert runner.up() == [m.name for m in migrations[backoff:]]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        flags = dict(conn.execute("SELECT product_id, in_backoff FROM job_items").fetchall())
        pending = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_job_items_pending'"
        ).fetchone()
    assert flags == {"due": False, "retry": True, "running": False, "failed": False}
    assert pending is not None and "NOT in_backoff" in pending[0]
    # Down: the old index back under its name, the column gone; up again: the schema's.
    later = len(migrations) - backoff
    assert runner.down(later)[-1] == "1730000026000_pending-backoff"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        pending = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_job_items_pending'"
        ).fetchone()
        column = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE column_name = 'in_backoff'"
        ).fetchone()
    assert pending is not None and "in_backoff" not in pending[0] and column is None
    runner.up()
    assert diff_against_schema(empty_database_url) == ""
