"""The operator's commands as processes: enqueue, worker, status, and what bad settings print."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from listener.stub.server import StubConfig, run_stub
from tests.support import (
    SLACK,
    UNSET,
    communicate,
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


def test_worker_without_database_url_uses_the_embedded_server_and_stops_it(
    tmp_path: Path,
) -> None:
    # cwd: the embedded server's default folder, .pgdata, lands in the test's own folder.
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env |= {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "worker"],
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
