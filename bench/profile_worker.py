"""Where a job's microseconds go: one listener worker process at its defaults on a no-op backlog
(100,000 items over 100 stores; 20,000 with --quick), sampled by py-spy (`pip install py-spy`),
beside the database's side of the same run.

The worker's samples are grouped by the step of an item's life their innermost frame of ours
belongs to (claim, dispatch, handler seam, outcome, completer, ...), and by the library whose
frame is innermost of all (psycopg, anyio, asyncio, json, ...): the CPU a step costs, including
the library calls it makes. The database's side: this database's transactions
(pg_stat_database, the harness's polls left out) and the worker's and its sessions' CPU
(/proc), per 1,000 items. py-spy samples at 200 Hz from outside the process (it does not slow
the worker the way cProfile does); the run is on a shared machine, so the shares are the figure
to read, the absolute CPU only beside a peer measured in the same run.
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    add_backlog,
    console,
    markdown_table,
    new_figure,
    publish,
    save_figure,
    scratch_database,
    table,
    timed,
)
from bench.peer_systems import STORES, PeerProcess, backend_cpu, block, cpu_seconds, scalar

NAME = "profile_worker"

# The step of an item's life each module of ours serves (the innermost frame of ours decides).
STEPS = {
    "listener/dispatch.py": "claim: dispatcher (waiters, ring, quotas)",
    "listener/ring.py": "claim: dispatcher (waiters, ring, quotas)",
    "listener/claimed.py": "claim: claim log line",
    "listener/items.py": "claim / outcome SQL calls (items.py)",
    "listener/worker.py": "worker loop (slot gate, process, emit)",
    "listener/attempt.py": "handler seam (attempt, payload, Item)",
    "listener/handler.py": "handler seam (attempt, payload, Item)",
    "bench/workers.py": "handler (no-op)",
    "bench/peer_workers.py": "handler (no-op)",
    "listener/complete.py": "completer",
    "listener/storable.py": "outcome (storable check)",
    "listener/limiter": "limiter (no budget: pass-through)",
    "listener/db.py": "database calls (pool)",
}


def step_of(stack: list[str]) -> str:
    """A collapsed stack (outermost first) to the step of its innermost frame of ours."""
    for frame in reversed(stack):
        for module, step in STEPS.items():
            if module in frame:
                return step
        if "/listener/" in frame:
            return "other listener code"
    return "event loop and start-up (no frame of ours)"


def library_of(stack: list[str]) -> str:
    leaf = stack[-1] if stack else ""
    for name in ("psycopg_pool", "psycopg", "anyio", "asyncio", "json", "logging", "selectors"):
        if f"/{name}/" in leaf or f"{name}/" in leaf or f"({name}" in leaf:
            return name
    if "/listener/" in leaf or "/bench/" in leaf:
        return "ours"
    return "other (stdlib, interpreter)"


def read_samples(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line."""
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def cprofile_run(quick: bool) -> dict[str, Any]:
    """The same backlog under cProfile timed by the worker's CPU time: the functions of ours by
    the CPU spent in them and below (cProfile's own cost inflates each call, so the shares are
    the figure, and the calls per item)."""
    items = 20_000 if quick else 100_000
    stats_file = Path(tempfile.mkdtemp(prefix="listener-cprofile-")) / "worker.prof"
    with scratch_database("profile") as url:
        proc = PeerProcess("listener", url, None, BENCH_CPROFILE=str(stats_file))
        try:
            proc.wait_for("ready", 60)
            with psycopg.connect(url, autocommit=True) as conn:
                add_backlog(conn, STORES, items // len(STORES))
            while scalar(url, block("done", "listener")) < items:
                time.sleep(0.1)
        finally:
            proc.stop()
    stats = pstats.Stats(str(stats_file))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values()) or 1.0
    ours = []
    for (filename, line, function), (_cc, calls, _tt, cumulative, _callers) in entries.items():
        if "/listener/" in filename or "/bench/" in filename or "psycopg" in filename:
            where = filename.split("/site-packages/")[-1].split("/wt-speed/")[-1]
            ours.append([f"{where}:{line} {function}", cumulative / total, calls / items])
    ours.sort(key=lambda row: -row[1])
    return {"quick": quick, "items": items, "cprofile": ours[:40]}


def run(quick: bool, native: bool = False, keep: str | None = None) -> dict[str, Any]:
    items = 20_000 if quick else 100_000
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy")
    out = Path(tempfile.mkdtemp(prefix="listener-profile-")) / "samples.txt"
    with scratch_database("profile") as url:
        proc = PeerProcess("listener", url, None)
        try:
            proc.wait_for("ready", 60)
            with psycopg.connect(url, autocommit=True) as conn:
                xacts_before = int(
                    conn.execute(
                        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = current_database()"
                    ).fetchone()[0]  # type: ignore[index]
                )
            sampler = subprocess.Popen(
                [py_spy, "record", "--pid", str(proc.process.pid), "--rate", "200", "--format",
                 "raw", "--output", str(out), "--nonblocking", *(["--native"] if native else [])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)  # py-spy attached before the backlog arrives
            before = cpu_seconds([proc.process.pid]), backend_cpu(url)
            with psycopg.connect(url, autocommit=True) as conn:
                add_backlog(conn, STORES, items // len(STORES))
            polls = 0
            while scalar(url, block("done", "listener")) < items:
                polls += 1
                time.sleep(0.1)
            worker_cpu = cpu_seconds([proc.process.pid]) - before[0]
            sessions = backend_cpu(url)
            db_cpu = sum(cpu - before[1].get(pid, 0.0) for pid, cpu in sessions.items())
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=60)
            time.sleep(1.1)  # pg_stat_database is flushed by idle backends once a second
            with psycopg.connect(url, autocommit=True) as conn:
                xacts_after = int(
                    conn.execute(
                        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = current_database()"
                    ).fetchone()[0]  # type: ignore[index]
                )
        finally:
            proc.stop()
    if keep:
        shutil.copy(out, keep)
    samples = read_samples(out)
    total = sum(count for _stack, count in samples) or 1
    steps: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for stack, count in samples:
        steps[step_of(stack)] += count
        libraries[library_of(stack)] += count
        functions[stack[-1] if stack else "?"] += count
    per_item_us = worker_cpu * 1e6 / items
    return {
        "quick": quick,
        "items": items,
        "samples": total,
        "worker_cpu_ms_per_1k": worker_cpu * 1e6 / items,
        "db_cpu_ms_per_1k": db_cpu * 1e6 / items,
        # The harness's own transactions: the polls, and its two reads of the counter.
        "transactions_per_1k": (xacts_after - xacts_before - polls - 2) * 1000 / items,
        "steps": [[s, n / total, n / total * per_item_us] for s, n in steps.most_common()],
        "libraries": [[s, n / total] for s, n in libraries.most_common()],
        "functions": [[s, n / total] for s, n in functions.most_common(25)],
    }


def cprofile_report(result: dict[str, Any]) -> str:
    rows = [[f, f"{share:.1%}", f"{calls:.2f}"] for f, share, calls in result["cprofile"]]
    headers = ["function (and below)", "share of worker CPU", "calls per item"]
    table("cProfile, timed by CPU: functions by cumulative CPU", headers, rows)
    return markdown_table(headers, rows) + "\n"


def report(result: dict[str, Any]) -> str:
    if "cprofile" in result:
        return cprofile_report(result)
    line = (
        f"{result['items']:,} no-op items, one process at its defaults: worker CPU "
        f"{result['worker_cpu_ms_per_1k']:,.0f} ms / 1,000 items, database sessions "
        f"{result['db_cpu_ms_per_1k']:,.0f} ms / 1,000, {result['transactions_per_1k']:.1f} "
        f"transactions / 1,000 ({result['samples']:,} samples)"
    )
    console.print(line)
    step_rows = [[s, f"{share:.1%}", f"{us:.1f} µs"] for s, share, us in result["steps"]]
    lib_rows = [[s, f"{share:.1%}"] for s, share in result["libraries"]]
    fn_rows = [[s[:110], f"{share:.1%}"] for s, share in result["functions"]]
    table("Worker CPU by step of an item's life", ["step", "share", "per item"], step_rows)
    table("Worker CPU by innermost library", ["library", "share"], lib_rows)
    table("Innermost functions", ["function", "share"], fn_rows)
    return (
        f"{line}\n\n"
        + markdown_table(["step", "share of worker CPU", "per item"], step_rows)
        + "\n\n"
        + markdown_table(["innermost library", "share"], lib_rows)
        + "\n\n"
        + markdown_table(["innermost function", "share"], fn_rows)
        + "\n"
    )


def plot(result: dict[str, Any]) -> None:
    if "cprofile" in result:
        return
    fig, ax = new_figure(9, 4.5)
    labels = [s for s, _share, _us in result["steps"]]
    values = [us for _s, _share, us in result["steps"]]
    ax.barh(labels[::-1], values[::-1], color="C0")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("worker CPU per item (µs)")
    ax.set_title("Where a no-op item's worker CPU goes (py-spy)")
    save_figure(fig, NAME if not result["quick"] else f"{NAME}_quick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20,000 items")
    parser.add_argument(
        "--native", action="store_true", help="C frames too (psycopg's, libpq's); slower sampling"
    )
    parser.add_argument("--keep", metavar="FILE", help="also copy py-spy's raw samples here")
    parser.add_argument(
        "--cprofile", action="store_true", help="cProfile timed by CPU instead of py-spy"
    )
    args = parser.parse_args()
    name = NAME + ("_cprofile" if args.cprofile else "") + ("_quick" if args.quick else "")

    def go(quick: bool) -> dict[str, Any]:
        result = cprofile_run(quick) if args.cprofile else run(quick, args.native, args.keep)
        return publish(name, result, report, plot)

    timed(go, args.quick)


if __name__ == "__main__":
    main()
