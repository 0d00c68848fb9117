"""`listener demo` as a user runs it: a process, headless, for a few seconds, with the real worker,
the stub, and either DATABASE_URL or the embedded PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from listener.demo.setup import describe_url
from listener.demo.store import STORES, plan
from tests.support import (
    UNSET,
    query_blocking,
)

# Not ours to inherit: the demo must choose the stub and (in one test) the embedded database.


def run_demo(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in UNSET} | env
    # cwd: a folder without the developer's .env, which would set DATABASE_URL behind our back.
    return subprocess.run(
        [sys.executable, "-m", "listener", "demo", "--headless", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def postgres_processes_of(data_dir: Path) -> list[str]:
    """Command lines of live processes naming the data folder (psutil is not a dependency)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if str(data_dir) in text and "postgres" in text:
            found.append(text)
    return found


def assert_every_store_started(output: str) -> None:
    assert "every store started: yes" in output, output
    for store in STORES:
        assert f"{store}: first item started" in output, output


def test_with_database_url_every_store_starts_and_the_demo_cleans_up(
    database_url: str, tmp_path: Path
) -> None:
    result = run_demo(tmp_path, "--seconds", "5", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "DATABASE_URL (" in result.stdout
    assert "a local stub" in result.stdout and "450 RPM scaled up" in result.stdout
    assert_every_store_started(result.stdout)
    assert "Summary" in result.stdout
    # Someone's real database: the demo's jobs, its limiter row and its heartbeat are gone.
    assert query_blocking(database_url, "SELECT count(*) FROM jobs") == [(0,)]
    assert query_blocking(database_url, "SELECT count(*) FROM rate_limiters") == [(0,)]
    assert query_blocking(database_url, "SELECT count(*) FROM worker_heartbeats") == [(0,)]


def test_the_bulk_store_runs_on_the_batch_tier_and_the_summary_shows_what_it_saved(
    database_url: str, tmp_path: Path
) -> None:
    # Long enough for every store to finish (the demo then ends early): the bulk store's batch
    # is answered, and its cost is half the realtime price.
    result = run_demo(tmp_path, "--seconds", "90", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every store has finished" in result.stdout, result.stdout
    assert "demo-mall on the batch tier" in result.stdout
    assert "demo-mall: first item started" in result.stdout and "Batch API batch" in result.stdout
    mall = next(line for line in result.stdout.splitlines() if line.strip().startswith("demo-mall"))
    assert " batch " in mall and "2,000" in mall and "yes, in" in mall, mall
    cost_line = next(line for line in result.stdout.splitlines() if line.startswith("cost $"))
    assert "saved $" in cost_line and ": batch $" in cost_line, cost_line
    saved = float(cost_line.split(": batch $")[1].split()[0])
    assert saved > 0
    # Nothing of the demo is left: its jobs, batches and usage rows are gone.
    left = query_blocking(
        database_url,
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM openai_batches),"
        " (SELECT count(*) FROM store_usage_recent), (SELECT count(*) FROM store_usage_daily),"
        " (SELECT count(*) FROM store_usage_monthly)",
    )
    assert left == [(0, 0, 0, 0, 0)]


def test_without_database_url_the_embedded_server_runs_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    result = run_demo(tmp_path, "--seconds", "4", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"an embedded PostgreSQL in {data_dir}" in result.stdout
    assert_every_store_started(result.stdout)
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()
    assert postgres_processes_of(data_dir) == []


def test_the_big_store_comes_first_and_the_small_ones_within_the_first_third() -> None:
    stores = plan(60)
    assert stores[0].arrives_after == 0 and stores[0].products == 2000
    assert all(10 <= s.products <= 100 for s in stores[1:])
    assert [s.arrives_after for s in stores] == sorted(s.arrives_after for s in stores)
    assert stores[-1].arrives_after == 20


def test_the_database_is_named_without_its_password() -> None:
    assert describe_url("postgresql://app:s3cret@db.example.com:6543/shop") == (
        "db.example.com:6543/shop"
    )
    assert "s3cret" not in describe_url("host=db password=s3cret dbname=shop")
