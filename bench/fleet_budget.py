"""9. The biggest accounts: 8 worker processes sharing one budget of 30,000 RPM through the one
`rate_limiters` row, with the instant handler (this 2-core machine cannot drive 500 requests a
second of 0.3 s answers through a stub as well), then the budget raised until the fleet stops
using it: where the single limiter row saturates.

On a PostgreSQL server of the run's own (as `bench.db_work`), so pg_stat_statements counts the
limiter's statements and the sessions' CPU is ours alone. For each budget: 200 stores with a
backlog larger than the window, 8 `python -m bench.peer_workers listener` processes at their
defaults but `RATE_LIMIT_RPM`, a warm-up, then a window in which are counted: items started
(`claimed_at`, the database's clock), the busiest 60 s (or, in a shorter window, the busiest
10 s scaled to a minute), the limiter's statements per grant and their execution time, and the
CPU of every session of the database (the workers' pools and listeners).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psycopg

from bench.common import (
    add_backlog,
    console,
    markdown_table,
    new_figure,
    publish,
    save_figure,
    sql,
    table,
    timed,
)
from bench.db_work import database, private_server
from bench.peers import PeerProcess, backend_cpu

NAME = "fleet_budget"
PROCESSES = 8
STORES = [f"store-{n:03d}" for n in range(200)]
WARM_UP = 5.0


def busiest(starts: list[float], width: float) -> int:
    """The most starts in any window of `width` seconds."""
    starts.sort()
    most, low = 0, 0
    for high, at in enumerate(starts):
        while starts[low] <= at - width:
            low += 1
        most = max(most, high - low + 1)
    return most


def one_budget(admin: str, url: str, rpm: int, seconds: float) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE job_items, jobs, worker_heartbeats, rate_limiters")
        per_store = int(rpm / 60 * (seconds + WARM_UP + 10) / len(STORES)) + 1
        add_backlog(conn, STORES, per_store)
        conn.execute("VACUUM ANALYZE job_items")
    procs = [PeerProcess("listener", url, None, RATE_LIMIT_RPM=str(rpm)) for _ in range(PROCESSES)]
    try:
        for proc in procs:
            proc.wait_for("ready", 120)
        time.sleep(WARM_UP)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
            now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert now is not None
        start = float(now[0])
        cpu_before = backend_cpu(url)
        time.sleep(seconds)
        cpu_after = backend_cpu(url)
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute(sql("peers")["limiter_statements"], {"dbname": "fleet"}).fetchone()
        assert row is not None
        reserves, reserve_ms = int(row[0]), float(row[1])
    finally:
        for proc in procs:
            proc.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        window = {"start": start, "stop": start + seconds}
        starts = [float(r[0]) for r in conn.execute(sql("peers")["starts_between"], window)]
    db_cpu = sum(cpu - cpu_before.get(pid, 0.0) for pid, cpu in cpu_after.items())
    width = 60.0 if seconds >= 60 else 10.0
    return {
        "rpm": rpm,
        "seconds": seconds,
        "started": len(starts),
        "budget_used_percent": 100.0 * len(starts) / (rpm / 60 * seconds),
        "busiest_window_seconds": width,
        "busiest_per_minute": busiest(starts, width) * 60 / width,
        "limiter_statements_per_grant": reserves / max(1, len(starts)),
        "limiter_ms_per_second": reserve_ms / seconds,
        "database_cpu_percent": 100.0 * db_cpu / seconds,
    }


def run(quick: bool, budgets: list[int]) -> dict[str, Any]:
    seconds = 20.0 if quick else 70.0
    results = []
    with private_server(max_connections=100) as admin, database(admin, "fleet", "listener") as url:
        for rpm in budgets:
            result = one_budget(admin, url, rpm, seconds)
            console.print(
                f"{rpm:,} RPM: {result['budget_used_percent']:.1f} % used, "
                f"{result['limiter_statements_per_grant']:.2f} limiter statements a grant"
            )
            results.append(result)
    return {"quick": quick, "processes": PROCESSES, "results": results}


HEADERS = [
    "budget (RPM)",
    "used",
    "busiest minute",
    "limiter statements / grant",
    "limiter execution (ms/s)",
    "database CPU (% of a core)",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{r['rpm']:,}",
            f"{r['budget_used_percent']:.1f} %",
            f"{r['busiest_per_minute']:,.0f}"
            + ("" if r["busiest_window_seconds"] >= 60 else " (10 s x 6)"),
            f"{r['limiter_statements_per_grant']:.2f}",
            f"{r['limiter_ms_per_second']:.0f}",
            f"{r['database_cpu_percent']:.0f} %",
        ]
        for r in result["results"]
    ]


def report(result: dict[str, Any]) -> str:
    title = f"{result['processes']} processes sharing one budget (instant handler)"
    table(title, HEADERS, rows(result))
    return markdown_table(HEADERS, rows(result)) + "\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 4)
    budgets = [r["rpm"] for r in result["results"]]
    ax.plot(budgets, [r["budget_used_percent"] for r in result["results"]], "o-")
    ax.axhline(98, color="C3", linestyle="--", label="98 %")
    ax.set_xscale("log")
    ax.set_xlabel("budget, requests per minute (8 processes)")
    ax.set_ylabel("budget used, %")
    ax.legend()
    save_figure(fig, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 s windows instead of 70 s")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[30_000, 60_000, 120_000], metavar="RPM"
    )
    args = parser.parse_args()
    timed(lambda quick: publish(NAME, run(quick, args.budgets), report, plot), args.quick)


if __name__ == "__main__":
    main()
