"""15. A claim plan cached while job_items was analyzed empty, before and after the statistics
watch's ANALYZE (`listener/statistics.py`).

For each backlog size: the tables are emptied and analyzed, a session with the worker's options
(generic plans) runs the claim six times (psycopg prepares it, its plan made from empty
statistics), then the backlog lands over 100 stores. The claim (100 stores x 1 item) is timed
on that session, the watch runs once (its ANALYZE timed), and the claim is timed again on the
same session: the same cached statement, planned again.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg

from bench.common import (
    console,
    load_in_chunks,
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    save_figure,
    scratch_database,
    summary,
    table,
    timed,
)
from listener.db import open_pool, with_session_options
from listener.settings import load_settings
from listener.sqlfiles import queries
from listener.statistics import StatisticsWatch

NAME = "stale_statistics"
STORES = 100
CLAIM: dict[str, Any] = {
    "stores": [f"store-{n:05d}" for n in range(STORES)],
    "limits": [1] * STORES,
    "worker_id": "bench",
    "lease_seconds": 60,
    "max_payload_bytes": 65_536,
    "announce": False,
    "kinds": ["product_description"],
    "lane": "openai",
}


def time_claims(conn: psycopg.Connection[Any], samples: int) -> list[float]:
    """Claims as the worker sends them, outside a transaction block: psycopg forgets what it
    prepared at a ROLLBACK. Each takes a store's head item for good (100 of at least 10,000),
    which changes no claim's cost: it reads index heads."""
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        conn.execute(queries("items")["claim"], CLAIM).fetchall()
        timings.append(time.perf_counter() - started)
    return timings


async def watch_once(url: str) -> float:
    pool = await open_pool(url, load_settings(database_url=url), name="bench-watch")
    async with pool:
        analyzed = await StatisticsWatch(pool).check()
    return sum(done.seconds for done in analyzed)


def one_backlog(url: str, pending: int, bar: Any) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("TRUNCATE jobs, job_items")
        admin.execute("ANALYZE jobs, job_items")
    settings = load_settings(database_url=url)
    with psycopg.connect(with_session_options(url, settings), autocommit=True) as worker:
        time_claims(worker, 6)
        load_in_chunks(url, CLAIM["stores"], pending // STORES, bar, analyze=False)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_stat_force_next_flush()")
        stale = time_claims(worker, 3 if pending >= 1_000_000 else 10)
        analyze_seconds = anyio.run(watch_once, url)
        refreshed = time_claims(worker, 30)
    return {
        "pending": pending,
        "stale_plan": summary(stale),
        "analyze_seconds": analyze_seconds,
        "after_watch": summary(refreshed),
    }


def run(quick: bool) -> dict[str, Any]:
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    with scratch_database("stale_statistics") as url, progress() as bar:
        steps = [one_backlog(url, pending, bar) for pending in sizes]
    return {"quick": quick, "stores": STORES, "steps": steps}


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{step['pending']:,}",
            f"{step['stale_plan']['p50'] * 1000:,.1f} ms",
            f"{step['analyze_seconds'] * 1000:,.0f} ms",
            f"{step['after_watch']['p50'] * 1000:,.2f} ms",
        ]
        for step in result["steps"]
    ]


HEADERS = [
    "pending",
    "claim, plan cached on empty stats (p50)",
    "the watch's ANALYZE",
    "claim after (p50)",
]


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result))


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(8, 3.5)
    labels = [f"{step['pending']:,}" for step in result["steps"]]
    positions = range(len(labels))
    stale = [step["stale_plan"]["p50"] * 1000 for step in result["steps"]]
    after = [step["after_watch"]["p50"] * 1000 for step in result["steps"]]
    ax.bar([p - 0.2 for p in positions], stale, width=0.4, label="plan cached on empty stats")
    ax.bar([p + 0.2 for p in positions], after, width=0.4, label="after the watch's ANALYZE")
    ax.set_xticks(list(positions), labels)
    ax.set_yscale("log")
    ax.set_xlabel("pending items over 100 stores")
    ax.set_ylabel("claim p50, ms (log)")
    ax.legend()
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    result = publish(NAME, timed(run, args.quick), report, plot)
    console.print(table("a claim plan cached on empty statistics", HEADERS, rows(result)))


if __name__ == "__main__":
    main()
