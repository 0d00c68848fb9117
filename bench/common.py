"""What every benchmark shares: scratch databases, bulk loading, the stub and worker processes,
statistics, results (JSON, tables, plots) and progress bars."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import matplotlib
import psycopg
from psycopg.conninfo import make_conninfo
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from listener.migrate import MigrationRunner
from listener.sqlfiles import parse_blocks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Piped to a file or a CI log, rich would assume 80 columns and squeeze the tables.
console = Console() if sys.stdout.isatty() else Console(width=130)


@functools.cache
def sql(filename: str) -> dict[str, str]:
    """The named blocks of `bench/<filename>.sql`."""
    return parse_blocks((BENCH / f"{filename}.sql").read_text(encoding="utf-8"))


# -- databases --------------------------------------------------------------------------------


def database_url(name: str) -> str:
    return make_conninfo(ADMIN_URL, dbname=name)


@contextlib.contextmanager
def scratch_database(suffix: str) -> Iterator[str]:
    """A fresh database `listener_bench_<suffix>` at the project's schema, dropped afterwards."""
    name = f"listener_bench_{suffix}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    try:
        MigrationRunner(url, output=lambda _line: None).up()
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_backlog(
    conn: psycopg.Connection[Any], stores: Sequence[str], counts: int | Sequence[int]
) -> None:
    """One job per store with `counts` items (one number for all, or one per store)."""
    per_store = [counts] * len(stores) if isinstance(counts, int) else list(counts)
    conn.execute(sql("queries")["add_backlog"], {"stores": list(stores), "counts": per_store})


def load_in_chunks(
    url: str,
    stores: Sequence[str],
    per_store: int,
    progress: Progress | None = None,
    rows_per_statement: int = 50_000,
    analyze: bool = True,
) -> None:
    """Bulk-load `per_store` items for each store, in statements of about 50,000 rows."""
    chunk = max(1, rows_per_statement // max(1, per_store))
    task = progress.add_task("loading", total=len(stores) * per_store) if progress else None
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, len(stores), chunk):
            part = stores[start : start + chunk]
            add_backlog(conn, part, per_store)
            if progress is not None and task is not None:
                progress.advance(task, len(part) * per_store)
        if analyze:
            conn.execute("VACUUM (ANALYZE) job_items")
    if progress is not None and task is not None:
        progress.remove_task(task)


async def insert_store(url: str, store: str, items: int) -> float:
    """What a client does: one job of `items` items in one transaction; returns the time.time()
    its commit returned."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql("queries")["add_backlog"], {"stores": [store], "counts": [items]})
        return time.time()


def query(url: str, block: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql("queries")[block], params).fetchall()


def execute(url: str, block: str, params: dict[str, Any] | None = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql("queries")[block], params)


def status_counts(url: str) -> dict[str, int]:
    return {str(status): int(n) for status, n in query(url, "status_counts")}


def connections(url: str) -> int:
    return int(query(url, "connections")[0][0])


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when every share is equal, 1/n when one takes everything."""
    total, squares = sum(values), sum(v * v for v in values)
    return (total * total) / (len(values) * squares) if squares else math.nan


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.1f} ms"


# -- results ----------------------------------------------------------------------------------


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    meta = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    path.write_text(json.dumps({**meta, **data}, indent=2, default=str) + "\n", encoding="utf-8")
    console.print(f"[dim]wrote {path.relative_to(ROOT)}[/dim]")
    return path


def read_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    out = Table(*headers, title=title, title_justify="left")
    for row in rows:
        out.add_row(*(str(cell) for cell in row))
    console.print(out)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig: Any, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    console.print(f"[dim]wrote {path.relative_to(ROOT)}[/dim]")
    return path


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def parse_args(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller, for a run under 5 minutes")
    return parser.parse_args()


def publish(
    name: str,
    result: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """A benchmark's last steps: its table as markdown, its JSON, its plot."""
    result["markdown"] = report(result)
    write_json(name, result)
    plot(result)
    return result


def timed(main: Callable[[bool], dict[str, Any]], quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    result = main(quick)
    console.print(f"[dim]took {time.monotonic() - started:.0f} s[/dim]")
    return result


# -- processes: the stub and workers ----------------------------------------------------------


_LISTENING = re.compile(r"listening on (http://[\w.]+:\d+)")


class StubProcess:
    """`python -m listener stub-openai` in its own process (its own core, its own event loop).

    It binds a port of its own choosing (port 0) and says which in its log: a port picked here
    and bound there could be taken in between, e.g. as the source port of an outgoing connection.
    """

    def __init__(self, log: IO[bytes], rpm: int = 0, latency: float = 0.0) -> None:
        command = [sys.executable, "-m", "listener", "stub-openai", "--port", "0"]
        command += ["--rpm", str(rpm), "--latency", str(latency)]
        env = {**os.environ, "LOG_LEVEL": "INFO"}
        self._log = log
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while not (found := _LISTENING.search(self.log())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenAI stub did not start:\n{self.log()[-2000:]}")
            time.sleep(0.05)
        self.url = found.group(1)
        self.base_url = f"{self.url}/v1"

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/stub/stats", timeout=5).json())

    def reset(self) -> None:
        httpx.post(f"{self.url}/stub/reset", timeout=5).raise_for_status()

    def stop(self) -> None:
        stop_processes([self.process])


@contextlib.contextmanager
def stub_process(rpm: int = 0, latency: float = 0.0) -> Iterator[StubProcess]:
    with tempfile.TemporaryFile("w+b") as log:
        stub = StubProcess(log, rpm, latency)
        try:
            yield stub
        finally:
            stub.stop()


LISTENER_WORKER = ("listener", "worker")
INSTANT_WORKER = ("bench.workers",)


def spawn_worker(
    url: str, base_url: str, command: Sequence[str] = LISTENER_WORKER, **env: str
) -> subprocess.Popen[bytes]:
    """`python -m listener worker` (the Procfile's process), configured from the environment;
    `command=INSTANT_WORKER` runs the same worker with an instant handler instead."""
    full_env = {
        **os.environ,
        "DATABASE_URL": url,
        "OPENAI_API_KEY": "bench-key",
        "OPENAI_BASE_URL": base_url,
        "RATE_LIMIT_TPM": "0",
        "LOG_LEVEL": "WARNING",
        **env,
    }
    full_env.pop("PORT", None)
    return subprocess.Popen(
        [sys.executable, "-m", *command],
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_workers_ready(
    url: str, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60.0
) -> None:
    """A worker process writes its heartbeat row once it has LISTENed and built its ring."""
    deadline = time.monotonic() + timeout
    wanted = {proc.pid for proc in procs}
    while not wanted <= {int(pid) for (pid,) in query(url, "ready_pids")}:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not become ready")
        time.sleep(0.05)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float = 30.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL whatever is still there after `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
