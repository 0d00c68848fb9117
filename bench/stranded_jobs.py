"""18. The reaper's stranded-jobs sweep against the number of open jobs, before and after
issue 25 (defect 6).

Before: one statement judged every open job with items on each pass (every 10 s, in every
process, with no lock). After: one pass judges the next STRANDED_CHUNK open jobs of a cursor
walking idx_jobs_open, under a tried advisory lock. The database holds 20,000 then 200,000 open
jobs (1,000,000 too in full mode) of one PENDING item each, one in 1,000 of them stranded (its
item finished, the job never closed), `VACUUM ANALYZE`d. Each statement runs in a transaction
that is rolled back, so every pass sees the same table. Reported: the old statement's time,
the new pass's time over one whole walk, how many passes a walk takes and so how long one
process needs to look at every open job once.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.common import (
    console,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    save_figure,
    scratch_database,
    sql,
    summary,
    table,
    timed,
)
from listener.items import STRANDED_CHUNK, STRANDED_LOCK_KEY
from listener.reaper import reap_interval
from listener.sqlfiles import queries

NAME = "stranded_jobs"
STRANDED_EVERY = 1_000
PASS_SECONDS = reap_interval(60.0)  # the reaper's interval at the default LEASE_SECONDS


def _rolled_back(conn: psycopg.Connection[Any], statement: str, params: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    row = conn.execute(statement, params).fetchone()
    elapsed = time.perf_counter() - started
    conn.rollback()
    return row, elapsed


def measure(url: str, open_jobs: int, reps: int) -> dict[str, Any]:
    before_sql = sql("baselines")["close_stranded_jobs_before"]
    after_sql = queries("items")["close_stranded_jobs"]
    with psycopg.connect(url) as conn:
        before = []
        for _ in range(reps):
            row, seconds = _rolled_back(conn, before_sql, None)
            before.append(seconds)
        closed_before = int(row[0])
        passes, closed_after, after = [], 0, 0
        while True:
            params = {"key": STRANDED_LOCK_KEY, "after": after, "chunk": STRANDED_CHUNK}
            row, seconds = _rolled_back(conn, after_sql, params)
            passes.append(seconds)
            closed_after += int(row[1])
            if int(row[2]) < STRANDED_CHUNK:
                break
            after = int(row[3])
    return {
        "open_jobs": open_jobs,
        "stranded": open_jobs // STRANDED_EVERY,
        "before": summary(before),
        "closed_before": closed_before,
        "after_pass": summary(passes),
        "passes_per_walk": len(passes),
        "closed_after": closed_after,
        "walk_seconds_one_process": len(passes) * PASS_SECONDS,
    }


def run(quick: bool) -> dict[str, Any]:
    sizes = [20_000, 200_000] if quick else [20_000, 200_000, 1_000_000]
    reps = 3 if quick else 5
    steps = []
    with scratch_database(NAME) as url:
        loaded = 0
        for size in sizes:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql("queries")["add_open_jobs"], {"count": size - loaded})
                # Strand again each step: the new jobs get their one in 1,000 too.
                conn.execute(sql("queries")["strand_jobs"], {"every": STRANDED_EVERY})
                conn.execute("VACUUM (ANALYZE) jobs")
                conn.execute("VACUUM (ANALYZE) job_items")
            loaded = size
            console.print(f"[dim]{size:,} open jobs loaded[/dim]")
            steps.append(measure(url, size, reps))
    return {"quick": quick, "chunk": STRANDED_CHUNK, "pass_seconds": PASS_SECONDS, "steps": steps}


HEADERS = [
    "open jobs",
    "before: one pass (p50)",
    "after: one pass (p50 / max)",
    "passes a walk",
    "a walk, one process",
    "stranded closed before / after",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for step in result["steps"]:
        after = step["after_pass"]
        out.append(
            [
                f"{step['open_jobs']:,}",
                f"{step['before']['p50'] * 1000:,.1f} ms",
                f"{after['p50'] * 1000:,.2f} / {after['max'] * 1000:,.2f} ms",
                f"{step['passes_per_walk']:,}",
                f"{step['walk_seconds_one_process'] / 60:,.1f} min",
                f"{step['closed_before']} / {step['closed_after']}",
            ]
        )
    return out


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result))


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 4)
    sizes = [step["open_jobs"] for step in result["steps"]]
    ax.plot(sizes, [s["before"]["p50"] * 1000 for s in result["steps"]], "o-", label="before")
    ax.plot(sizes, [s["after_pass"]["p50"] * 1000 for s in result["steps"]], "o-", label="after")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("open jobs")
    ax.set_ylabel("one sweep pass, p50 (ms)")
    ax.legend()
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    result = publish(NAME, timed(run, args.quick), report, plot)
    console.print(table("the stranded-jobs sweep", HEADERS, rows(result)))


if __name__ == "__main__":
    main()
