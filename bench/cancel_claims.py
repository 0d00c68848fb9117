"""18. Claims during a long cancel (issue 25, weakness 9): `python -m bench.cancel_claims [--quick]
[--baseline DIR]`.

Under a budget, a claim carries the outcomes waiting in its transaction. A store-wide cancel holds
its jobs' rows until it commits; a claim that waits for one of them (it carries an outcome of that
store) holds its workers' limiter slots meanwhile, and fails after `DB_LOCK_TIMEOUT_SECONDS` (5 s),
its slots lost (with `DB_LOCK_TIMEOUT_SECONDS` 5 and 1). Here: `python -m listener worker` at
1,200 RPM (`WORKER_CONCURRENCY=8`), the stub
answering in 50 ms, store `big` with 100,000 items in one job and 4 other stores backlogged. After
a warm-up, `python -m listener cancel --store big`. Measured from the cancel's start to 1 s after
it returned: the items started against what the budget allows in that time (slots lost = the
difference), and the worker's `claim failed` lines. `--baseline DIR` runs another version's
`listener` package (e.g. `git archive a20233d listener | tar -x -C DIR`) in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    ROOT,
    add_backlog,
    console,
    markdown_table,
    new_figure,
    publish,
    save_figure,
    scratch_database,
    stop_processes,
    stub_process,
    table,
    wait_workers_ready,
)

NAME = "cancel_claims"
RPM = 1200
BIG = 100_000
OTHERS = [f"other-{n}" for n in range(4)]
WARMUP = 5.0
AFTER = 1.0
LOCK_TIMEOUTS = (5.0, 1.0)

STARTS = """
SELECT count(*) FROM job_items
WHERE claimed_at >= to_timestamp(%(since)s) AND claimed_at < to_timestamp(%(until)s)
"""


def one_run(label: str, source: Path, lock_timeout: float) -> dict[str, Any]:
    with (
        scratch_database("cancel_claims") as url,
        stub_process(0, 0.05) as stub,
        tempfile.TemporaryFile("w+b") as log,
    ):
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(BIG // 50_000):
                add_backlog(conn, ["big"], 50_000)
            add_backlog(conn, OTHERS, 2_000)
            conn.execute("VACUUM (ANALYZE) job_items")
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": stub.base_url,
            "RATE_LIMIT_RPM": str(RPM),
            "RATE_LIMIT_TPM": "0",
            "WORKER_CONCURRENCY": "8",
            "LOG_LEVEL": "WARNING",
            "DB_LOCK_TIMEOUT_SECONDS": str(lock_timeout),
        }
        env.pop("PORT", None)
        worker = subprocess.Popen(
            [sys.executable, "-m", "listener", "worker"],
            env=env,
            cwd=source,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_workers_ready(url, [worker])
            time.sleep(WARMUP)
            began = time.time()
            cancel = subprocess.run(
                [sys.executable, "-m", "listener", "cancel", "--store", "big"],
                env=env,
                cwd=source,
                capture_output=True,
                text=True,
                check=True,
            )
            returned = time.time()
            time.sleep(AFTER)
            ended = time.time()
        finally:
            stop_processes([worker])
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(STARTS, {"since": began, "until": ended}).fetchone()
            started = int(row[0]) if row else 0
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    allowed = RPM / 60 * (ended - began)
    return {
        "version": label,
        "lock_timeout_seconds": lock_timeout,
        "cancel_seconds": returned - began,
        "cancel_output": cancel.stdout.strip(),
        "window_seconds": ended - began,
        "slots_in_window": allowed,
        "items_started": started,
        "slots_lost": max(0.0, allowed - started),
        "claims_failed": sum("claim failed" in line for line in lines),
    }


def run(quick: bool, baseline: Path | None) -> dict[str, Any]:
    runs = []
    # The default lock timeout (5 s, longer than this machine's cancel), and 1 s: a cancel that
    # outlasts the lock timeout, as a larger store's or a slower database's does.
    for lock_timeout in LOCK_TIMEOUTS:
        if baseline is not None:
            runs.append(one_run(f"baseline ({baseline})", baseline, lock_timeout))
        runs.append(one_run("this version", ROOT, lock_timeout))
    return {
        "quick": quick,
        "rpm": RPM,
        "big": BIG,
        "runs": runs,
        "note": "",
    }


HEADERS = [
    "version",
    "lock timeout",
    "cancel took",
    "window",
    "budget's slots",
    "started",
    "slots lost",
    "claims failed",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r["version"],
            f"{r['lock_timeout_seconds']:g} s",
            f"{r['cancel_seconds']:.1f} s",
            f"{r['window_seconds']:.1f} s",
            f"{r['slots_in_window']:.0f}",
            str(r["items_started"]),
            f"{r['slots_lost']:.0f}",
            str(r["claims_failed"]),
        ]
        for r in result["runs"]
    ]


def report(result: dict[str, Any]) -> str:
    title = f"Claims during `cancel --store` of {BIG:,} items, {RPM} RPM"
    table(title, HEADERS, rows(result))
    return markdown_table(HEADERS, rows(result)) + "\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    labels = [f"{r['version'][:8]}, {r['lock_timeout_seconds']:g} s" for r in result["runs"]]
    ax.bar(labels, [r["slots_lost"] for r in result["runs"]])
    ax.set_ylabel("limiter slots lost during the cancel (+1 s)")
    ax.set_title(f"cancel --store of {BIG:,} items at {RPM} RPM")
    save_figure(fig, NAME)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the same run (it is short)")
    parser.add_argument("--baseline", type=Path, help="a directory holding another `listener`")
    args = parser.parse_args()
    started = time.monotonic()
    publish(NAME, run(args.quick, args.baseline), report, plot)
    console.print(f"[dim]took {time.monotonic() - started:.0f} s[/dim]")
