"""7. Claims while pruning: the claim's latency while `listener prune` deletes finished rows,
against the same claims with nothing being pruned.

The database holds a backlog of PENDING items over 1,000 stores (what claims read) and jobs that
finished 30 days ago: 1,000,000 finished items (200,000 in quick mode), each with a result. The
project's claim (10 stores x 10 items, the stores rotating, each claim rolled back so the backlog
holds) runs back to back for a while with nothing else, then again while `python -m listener
prune --older-than 7d` runs as its own process with its default batches (1,000 items, 100 jobs,
20 ms apart). Reported: claim p50 / p99 / max in both phases, how long the prune took and the
rows it deleted per second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import psycopg

from bench.common import (
    ROOT,
    console,
    load_in_chunks,
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    save_figure,
    scratch_database,
    sql,
    summary,
    table,
    timed,
)
from listener.sqlfiles import queries

NAME = "retention"
STORES = [f"store-{n:04d}" for n in range(1000)]
PENDING_PER_STORE = 50
ITEMS_PER_JOB = 1000


def claim_params(turn: int) -> dict[str, Any]:
    stores = [STORES[(turn * 10 + k) % len(STORES)] for k in range(10)]
    return {
        "worker_id": "bench-retention",
        "lease_seconds": 60,
        "max_payload_bytes": 65_536,
        "announce": False,
        "kinds": ["product_description"],
        "lane": "openai",
        "stores": stores,
        "limits": [10] * 10,
    }


def claims_until(conn: psycopg.Connection[Any], done: Any, turn: int) -> tuple[list[float], int]:
    """Claim (and roll back) back to back until `done()`; the latency of each claim."""
    text = queries("items")["claim"]
    timings: list[float] = []
    while not done():
        with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            conn.execute(text, claim_params(turn)).fetchall()
            timings.append(time.perf_counter() - started)
        turn += 1
    return timings, turn


def run(quick: bool) -> dict[str, Any]:
    finished = 200_000 if quick else 1_000_000
    baseline_seconds = 10.0 if quick else 20.0
    with scratch_database("retention") as url, progress() as bar:
        load_in_chunks(url, STORES, PENDING_PER_STORE, bar)
        task = bar.add_task("loading finished jobs", total=finished)
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(finished // (50 * ITEMS_PER_JOB)):
                conn.execute(sql("queries")["add_finished"], {"jobs": 50, "items": ITEMS_PER_JOB})
                bar.advance(task, 50 * ITEMS_PER_JOB)
            conn.execute("VACUUM (ANALYZE) job_items")
            conn.execute("VACUUM (ANALYZE) jobs")
        bar.remove_task(task)
        with psycopg.connect(url, autocommit=True) as conn:
            warm_up = iter(range(20))
            claims_until(conn, lambda: next(warm_up, None) is None, 0)
            deadline = time.monotonic() + baseline_seconds
            quiet, turn = claims_until(conn, lambda: time.monotonic() > deadline, 0)
            env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"}
            started = time.monotonic()
            prune = subprocess.Popen(
                [sys.executable, "-m", "listener", "prune", "--older-than", "7d"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            pruning, _ = claims_until(conn, lambda: prune.poll() is not None, turn)
            prune_seconds = time.monotonic() - started
            output = prune.communicate()[0].strip()
            left = conn.execute("SELECT count(*) FROM job_items WHERE status = 'COMPLETED'")
            remaining = left.fetchone()
    assert prune.returncode == 0, output
    assert remaining == (0,), remaining
    return {
        "quick": quick,
        "finished_items": finished,
        "pending_items": PENDING_PER_STORE * len(STORES),
        "quiet": summary(quiet),
        "pruning": summary(pruning),
        "prune_seconds": prune_seconds,
        "prune_output": output,
        "rows_per_second": finished / prune_seconds,
        "note": "" if not quick else "quick mode: 200,000 finished items; the full run 1,000,000",
    }


HEADERS = ["claims", "n", "p50 ms", "p99 ms", "max ms"]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for phase, label in (("quiet", "nothing pruned"), ("pruning", "while pruning")):
        stats = result[phase]
        out.append(
            [
                label,
                str(stats["n"]),
                f"{stats['p50'] * 1000:.2f}",
                f"{stats['p99'] * 1000:.2f}",
                f"{stats['max'] * 1000:.2f}",
            ]
        )
    return out


def report(result: dict[str, Any]) -> str:
    return (
        markdown_table(HEADERS, rows(result))
        + f"\n\n`{result['prune_output']}` in {result['prune_seconds']:.1f} s "
        f"({result['rows_per_second']:,.0f} finished items a second), "
        f"{result['pending_items']:,} PENDING items claimed from meanwhile.\n"
    )


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    labels = ["p50", "p99", "max"]
    width = 0.38
    for offset, (phase, label) in enumerate(
        (("quiet", "nothing pruned"), ("pruning", "while pruning"))
    ):
        values = [result[phase][key] * 1000 for key in ("p50", "p99", "max")]
        ax.bar([i + offset * width for i in range(3)], values, width, label=label)
    ax.set_xticks([i + width / 2 for i in range(3)], labels)
    ax.set_ylabel("claim latency (ms)")
    ax.set_title(f"claims (10 stores x 10) while pruning {result['finished_items']:,} rows")
    ax.legend()
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    result = run(quick)
    table("Claims while pruning", HEADERS, rows(result))
    console.print(report(result).split("\n\n")[1])
    return publish(NAME, result, report, plot)


if __name__ == "__main__":
    args = parse_args(__doc__)
    timed(main, args.quick)
