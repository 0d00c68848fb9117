"""The operator's commands as processes: enqueue, worker, status, and what bad settings print."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import listener
from listener.cli import GROUPS, _every_command, _subparsers, build_parser
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    SLACK,
    UNSET,
    communicate,
    query_blocking,
    run_listener,
    spawn_worker,
    wait_for_counts,
    wait_until,
    worker_is_ready,
)
from tests.test_demo import postgres_processes_of


def table_row(output: str, first_cell: str) -> list[str]:
    """The cells of the rich table row that starts with `first_cell`."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@pytest.mark.anyio
async def test_enqueue_then_worker_completes_the_job_and_status_reports_it(
    database_url: str,
) -> None:
    enqueued = run_listener(
        "enqueue", "--store", "s1", "--products", "5", DATABASE_URL=database_url
    )
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip()
    assert job_id.isdigit(), enqueued.stdout

    backlog = run_listener("status", DATABASE_URL=database_url)
    assert backlog.returncode == 0, backlog.stderr
    assert "Backlog per store" in backlog.stdout
    assert table_row(backlog.stdout, "s1") == ["s1", "5", "0"]  # 5 pending, 0 processing

    async with run_stub(StubConfig()) as stub:
        worker = spawn_worker(database_url, stub.base_url)
        try:
            await wait_until(lambda: worker_is_ready(database_url, worker.pid))
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 5})
        finally:
            worker.send_signal(signal.SIGTERM)
            output = await communicate(worker, 30)
    assert worker.returncode == 0, output
    assert stub.state.completed_total == 5

    status = run_listener("status", job_id, DATABASE_URL=database_url)
    assert status.returncode == 0, status.stderr
    # job, store, status, pending, processing, completed, failed, cancelled
    assert table_row(status.stdout, job_id) == [job_id, "s1", "COMPLETED", "0", "0", "5", "0", "0"]


def test_status_of_an_unknown_job_is_one_clear_line(database_url: str) -> None:
    result = run_listener("status", "424242", DATABASE_URL=database_url)
    assert result.returncode == 1
    assert result.stderr == "listener: no job 424242\n"


def test_a_bad_setting_is_one_line_naming_it_and_exit_2() -> None:
    result = run_listener("migrate", "status", DB_POOL_MAX="abc")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "DB_POOL_MAX" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_secrets_never_appear_in_a_settings_error() -> None:
    secrets = {
        "OPENAI_API_KEY": "sk-secret-0123456789abcdef",
        "DATABASE_URL": "postgresql://app:pw-secret-42@db.invalid:5432/shop",
    }
    for bad in ({"RATE_LIMIT_RPM": "-1"}, {"DB_POOL_MIN": "9", "DB_POOL_MAX": "2"}):
        result = run_listener("worker", **secrets, **bad)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("listener: invalid setting"), result.stderr
        for secret in ("sk-secret-0123456789abcdef", "pw-secret-42"):
            assert secret not in result.stdout + result.stderr


# Every command that reads or writes the database, with the arguments it needs.
DATABASE_COMMANDS = [
    ["worker"],
    ["api"],
    ["doctor"],
    ["status"],
    ["enqueue", "--store", "s1", "--products", "1"],
    ["store", "show"],
    ["store", "pause", "s1"],
    ["store", "set", "s1", "--weight", "2"],
    ["cancel", "1"],
    ["retry", "1"],
    ["prune", "--older-than", "7d"],
    ["migrate", "up"],
    ["migrate", "status"],
    ["migrate", "check"],
]


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_without_database_url_a_command_is_one_line_naming_the_setting_and_the_flag(
    command: list[str], tmp_path: Path
) -> None:
    # An operator's `store pause X` with DATABASE_URL unset once paused a store in a fresh
    # local .pgdata and exited 0.
    result = run_listener(*command, cwd=tmp_path, OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("listener: invalid setting DATABASE_URL: not set")
    assert "--database-url" in result.stderr and "--embedded" in result.stderr
    assert not (tmp_path / ".pgdata").exists()


def test_a_database_url_flag_that_does_not_parse_is_one_line_without_its_password() -> None:
    for url in (
        "postgresql://app:pw-secret-42@db:port/shop",
        "host=db port=x password=pw-secret-42",
    ):
        result = run_listener("--database-url", url, "status")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("listener: invalid setting DATABASE_URL: ")
        assert result.stderr.count("\n") == 1
        assert "pw-secret-42" not in result.stdout + result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_database_url_flag_wins_over_the_environment(database_url: str, where: str) -> None:
    flag = ["--database-url", database_url]
    args = [*flag, "status", "--json"] if where == "before" else ["status", "--json", *flag]
    result = run_listener(*args, DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"jobs": [], "backlog": []}


def test_a_flag_wins_over_the_environment_and_both_flags_are_refused(database_url: str) -> None:
    flagged = run_listener("--database-url", database_url, "status", LISTENER_EMBEDDED="1")
    assert flagged.returncode == 0, flagged.stderr
    both = run_listener("--embedded", "status", "--database-url", database_url)
    assert (both.returncode, both.stderr) == (
        2,
        "listener: --database-url and --embedded: give one or the other\n",
    )


def test_an_unreachable_database_is_exit_3_and_one_line() -> None:
    result = run_listener("status", DATABASE_URL="postgresql://postgres@127.0.0.1:9/none")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.fixture
def outside_pytest_tmp() -> Iterator[Path]:
    """A folder for an embedded server's .pgdata. Not tmp_path: pgserver runs the server as its
    own user and opens the folders above to it, and a pytest session starting meanwhile (another
    engineer's, on a shared machine) closes /tmp/pytest-of-root again (0700)."""
    with tempfile.TemporaryDirectory(prefix="listener-embedded-") as folder:
        yield Path(folder)


def test_worker_with_embedded_uses_the_embedded_server_and_stops_it(
    outside_pytest_tmp: Path,
) -> None:
    tmp_path = outside_pytest_tmp
    # cwd: the embedded server's default folder, .pgdata, lands in the test's own folder.
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env |= {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "worker", "--embedded"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    # A thread drains the output, so a full pipe never blocks the worker and a silent worker
    # cannot block the test.
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        # Ready once migrated and listening; initdb makes the first start take a few seconds.
        deadline = time.monotonic() + 60 * SLACK
        while not any("[Worker] ✅ Initialized" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30 * SLACK)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "using the embedded PostgreSQL in .pgdata" in output
    assert postgres_processes_of((tmp_path / ".pgdata").resolve()) == []


def test_every_argument_has_help_and_every_command_a_group() -> None:
    parser = build_parser()
    commands = [parser, *_every_command(parser)]
    for command in commands:
        for action in command._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            assert action.help, f"{command.prog}: {action.dest} has no help"
    text = parser.format_help()
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    grouped = {name for names in GROUPS.values() for name in names}
    [top] = _subparsers(parser)
    assert set(top.choices) == grouped and grouped <= listed
    for group in GROUPS:
        assert f"{group} commands:" in text
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"^  {code} +\S", text, re.MULTILINE), text


def test_help_shows_defaults_and_the_environment_variables_read() -> None:
    status = run_listener("status", "--help")
    assert status.returncode == 0
    text = " ".join(status.stdout.split())
    assert "--limit LIMIT the most jobs, failed items and stores shown (default: 10)" in text
    assert "(env: DATABASE_URL)" in text and "(env: LISTENER_EMBEDDED=1" in text
    prune = " ".join(run_listener("prune", "--help").stdout.split())
    assert "--dry-run count, delete nothing" in prune


def test_version_is_the_package_version() -> None:
    result = run_listener("--version")
    assert (result.returncode, result.stdout) == (0, f"listener {listener.__version__}\n")


@pytest.mark.parametrize(
    "args", [["bogus"], ["status", "--bogus"], ["store"], ["status", "--limit", "0"]]
)
def test_an_unknown_command_or_flag_is_argparse_usage_and_exit_2(args: list[str]) -> None:
    result = run_listener(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: listener"), result.stderr
    assert "Traceback" not in result.stderr


def test_status_and_store_show_as_json_with_a_limit(database_url: str) -> None:
    jobs = [
        run_listener("enqueue", "--store", s, "--products", "2", DATABASE_URL=database_url)
        for s in ("s1", "s2", "s3")
    ]
    assert all(job.returncode == 0 for job in jobs)
    ids = [int(job.stdout) for job in jobs]
    latest = run_listener("status", "--json", "--limit", "2", DATABASE_URL=database_url)
    assert latest.returncode == 0, latest.stderr
    document = json.loads(latest.stdout)
    assert [job["job"] for job in document["jobs"]] == ids[:0:-1]
    assert document["jobs"][0] | {"created_at": None} == {
        "job": ids[2],
        "store": "s3",
        "status": "PENDING",
        "created_at": None,
        "completed_at": None,
        "pending": 2,
        "processing": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert len(document["backlog"]) == 2
    one = json.loads(
        run_listener("status", str(ids[0]), "--json", DATABASE_URL=database_url).stdout
    )
    assert [job["store"] for job in one["jobs"]] == ["s1"] and one["failed_items"] == []

    run_listener("store", "set", "s2", "--weight", "5", DATABASE_URL=database_url)
    shown = run_listener("store", "show", "--json", "--limit", "2", DATABASE_URL=database_url)
    assert shown.returncode == 0, shown.stderr
    stores = json.loads(shown.stdout)["stores"]
    assert len(stores) == 2
    s2 = json.loads(run_listener("store", "show", "s2", "--json", DATABASE_URL=database_url).stdout)
    (entry,) = s2["stores"]
    cost = entry.pop("cost")
    assert entry == {
        "store": "s2",
        "weight": 5,
        "rpm_limit": None,
        "max_in_flight": None,
        "paused": False,
        "backlog": 2,
        "in_flight": 0,
        "last_minute": 0,
    }
    # Nothing completed yet: no cost, and the price table's date beside the figures.
    assert cost["today"]["cost_usd"] == cost["month"]["cost_usd"] == 0
    assert s2["prices"]["read_on"]


@pytest.mark.anyio
async def test_the_embedded_postgresql_16_migrates_checks_and_completes_items(
    outside_pytest_tmp: Path,
) -> None:
    """The embedded server is the second PostgreSQL major version the project supports (16,
    pgserver's; the machine's is 15): the schema, `migrate check` and a worker on it."""
    import pgserver

    tmp_path = outside_pytest_tmp

    for step in (("migrate", "up"), ("migrate", "check")):
        done = run_listener("--embedded", *step, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    enqueued = run_listener(
        "--embedded", "enqueue", "--store", "s1", "--products", "3", cwd=tmp_path
    )
    assert enqueued.returncode == 0, enqueued.stderr
    server = pgserver.get_server(str((tmp_path / ".pgdata").resolve()), cleanup_mode="stop")
    try:
        url = server.get_uri()
        [(version,)] = query_blocking(url, "SELECT current_setting('server_version_num')::int")
        assert version // 10_000 == 16
        async with run_stub(StubConfig()) as stub:
            worker = spawn_worker(url, stub.base_url)
            try:
                await wait_until(lambda: worker_is_ready(url, worker.pid))
                await wait_for_counts(url, lambda c: c == {"COMPLETED": 3})
            finally:
                worker.send_signal(signal.SIGTERM)
                output = await communicate(worker, 30)
        assert worker.returncode == 0, output
    finally:
        server.cleanup()
