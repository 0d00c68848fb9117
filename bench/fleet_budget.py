"""13. The biggest accounts: 8 worker processes sharing one budget of 30,000 RPM through the one
`rate_limiters` row, with the instant handler (this 2-core machine cannot drive 500 requests a
second of 0.3 s answers through a stub as well), then the budget raised until the fleet stops
using it: where the single limiter row saturates, and what saturates first.

On a PostgreSQL server of the run's own (as `bench.db_work`), so pg_stat_statements counts the
fleet's statements and the sessions' CPU is ours alone. For each budget: 200 stores with a
backlog larger than the window, 8 `python -m bench.peer_workers listener` processes at their
defaults but `RATE_LIMIT_RPM`, a warm-up, then a window in which are counted: items started
(`claimed_at`, the database's clock), the busiest 60 s (or, in a shorter window, the busiest
10 s scaled to a minute), the limiter's statements, the claims and all statements per grant, the
limiter's execution time, the CPU of every session of the database (the workers' pools and
listeners) and of the 8 worker processes. After the fleet stops: items started twice (none
expected) and items left PROCESSING (none expected).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
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
    sql,
    table,
    timed,
)
from bench.db_work import database, private_server
from bench.peer_systems import PeerProcess, backend_cpu, cpu_seconds
from listener.sqlfiles import queries

NAME = "fleet_budget"
PROCESSES = 8
STORES = [f"store-{n:03d}" for n in range(200)]
WARM_UP = 5.0
ROW_CLIENTS = [1, 8, 32]


def busiest(starts: list[float], width: float) -> int:
    """The most starts in any window of `width` seconds."""
    starts.sort()
    most, low = 0, 0
    for high, at in enumerate(starts):
        while starts[low] <= at - width:
            low += 1
        most = max(most, high - low + 1)
    return most


def one_budget(
    admin: str,
    url: str,
    rpm: int,
    seconds: float,
    source: str | None = None,
    concurrency: int | None = None,
) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE job_items, jobs, worker_heartbeats, rate_limiters")
        per_store = int(rpm / 60 * (seconds + WARM_UP + 10) / len(STORES)) + 1
        add_backlog(conn, STORES, per_store)
        conn.execute("VACUUM ANALYZE job_items")
    procs = [
        PeerProcess("listener", url, concurrency, source, RATE_LIMIT_RPM=str(rpm))
        for _ in range(PROCESSES)
    ]
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
        pids = [proc.process.pid for proc in procs]
        workers_before = cpu_seconds(pids)
        time.sleep(seconds)
        workers_cpu = cpu_seconds(pids) - workers_before
        cpu_after = backend_cpu(url)
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute(sql(NAME)["statements"], {"dbname": "fleet"}).fetchone()
        assert row is not None
        reserves, reserve_ms, claims, statements = int(row[0]), float(row[1]), row[2], row[3]
    finally:
        for proc in procs:
            proc.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        window = {"start": start, "stop": start + seconds}
        starts = [float(r[0]) for r in conn.execute(sql("peers")["starts_between"], window)]
        twice, processing = conn.execute(sql(NAME)["started_twice"]).fetchone() or (0, 0)
    db_cpu = sum(cpu - cpu_before.get(pid, 0.0) for pid, cpu in cpu_after.items())
    width = 60.0 if seconds >= 60 else 10.0
    grants = max(1, len(starts))
    return {
        "rpm": rpm,
        "seconds": seconds,
        "started": len(starts),
        "budget_used_percent": 100.0 * len(starts) / (rpm / 60 * seconds),
        "busiest_window_seconds": width,
        "busiest_per_minute": busiest(starts, width) * 60 / width,
        "limiter_statements_per_grant": reserves / grants,
        "limiter_statements_per_second": reserves / seconds,
        "claims_per_grant": int(claims) / grants,
        "statements_per_grant": int(statements) / grants,
        "limiter_ms_per_second": reserve_ms / seconds,
        "database_cpu_percent": 100.0 * db_cpu / seconds,
        "workers_cpu_percent": 100.0 * workers_cpu / seconds,
        "workers_cpu_ms_per_grant": 1000.0 * workers_cpu / grants,
        "started_twice": int(twice),
        "left_processing": int(processing),
    }


def pgbench_script(rows: int) -> str:
    """The limiter's own `reserve` statement for pgbench: one slot of 30,000 RPM a statement,
    on the one row of the fleet (`rows` = 1) or spread over `rows` rows (no lock shared)."""
    name = "'openai'" if rows == 1 else f"('row-' || (:client_id % {rows}))"
    text = queries("limiter")["reserve"].replace("%(name)s", name)
    text = text.replace("%(request_advance)s", "'2000 microseconds'::interval")
    text = text.replace("%(token_advance)s", "'0'::interval").replace("%(settle)s", "'0'::interval")
    # pgbench reads a statement per line: the comments out, the rest on one line.
    return " ".join(re.sub(r"--[^\n]*", "", text).split()) + ";\n"


def row_alone(url: str, seconds: float) -> list[dict[str, Any]]:
    """Reservations a second the row takes from pgbench's clients (C, prepared statements: the
    clients cost little next to the workers), against the same load spread over one row per
    client: where the two part, the clients queue on the row's lock."""
    bindir = Path(subprocess.check_output(["pg_config", "--bindir"], text=True).strip())
    found = []
    with tempfile.TemporaryDirectory() as scratch:
        for clients in ROW_CLIENTS:
            for rows in sorted({1, clients}):
                script = Path(scratch) / f"reserve-{rows}.sql"
                script.write_text(pgbench_script(rows), encoding="utf-8")
                command = [str(bindir / "pgbench"), "-n", "-M", "prepared", "-j", "2"]
                command += ["-c", str(clients), "-T", str(int(seconds)), "-f", str(script), url]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                tps = re.search(r"tps = ([\d.]+)", out)
                latency = re.search(r"latency average = ([\d.]+) ms", out)
                if tps is None or latency is None:
                    raise RuntimeError(f"pgbench said: {out}")
                found.append(
                    {
                        "clients": clients,
                        "rows": rows,
                        "reservations_per_second": float(tps.group(1)),
                        "latency_ms": float(latency.group(1)),
                    }
                )
                console.print(
                    f"row alone: {clients} client(s) on {rows} row(s): "
                    f"{float(tps.group(1)):,.0f} reservations a second"
                )
    return found


def run(
    quick: bool, budgets: list[int], baseline: str | None, concurrency: int | None
) -> dict[str, Any]:
    seconds = 20.0 if quick else 70.0
    versions = [("listener", None)] + ([("listener BEFORE", baseline)] if baseline else [])
    results = []
    # Each process holds a pool of DB_POOL_MAX and a listener; room for more processes' worth.
    with private_server(max_connections=200) as admin, database(admin, "fleet", "listener") as url:
        for rpm in budgets:
            for version, source in versions:
                result = one_budget(admin, url, rpm, seconds, source, concurrency)
                result["version"] = version
                results.append(result)
                console.print(
                    f"{version}, {rpm:,} RPM: {result['budget_used_percent']:.1f} % used, "
                    f"{result['limiter_statements_per_grant']:.2f} limiter statements and "
                    f"{result['claims_per_grant']:.2f} claims a grant, workers' CPU "
                    f"{result['workers_cpu_ms_per_grant']:.2f} ms a grant"
                )
        alone = row_alone(url, 5.0 if quick else 15.0)
    return {
        "quick": quick,
        "processes": PROCESSES,
        "baseline": baseline,
        "concurrency": concurrency,
        "results": results,
        "row_alone": alone,
    }


HEADERS = [
    "version",
    "budget (RPM)",
    "used",
    "busiest minute",
    "limiter statements / grant",
    "limiter statements / s",
    "claims / grant",
    "statements / grant",
    "limiter execution (ms/s)",
    "database CPU (% of a core)",
    "workers' CPU (% of a core)",
    "workers' CPU / grant",
    "started twice",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r.get("version", "listener"),
            f"{r['rpm']:,}",
            f"{r['budget_used_percent']:.1f} %",
            f"{r['busiest_per_minute']:,.0f}"
            + ("" if r["busiest_window_seconds"] >= 60 else " (10 s x 6)"),
            f"{r['limiter_statements_per_grant']:.3f}",
            f"{r['limiter_statements_per_second']:.0f}",
            f"{r['claims_per_grant']:.2f}",
            f"{r['statements_per_grant']:.2f}",
            f"{r['limiter_ms_per_second']:.0f}",
            f"{r['database_cpu_percent']:.0f} %",
            f"{r['workers_cpu_percent']:.0f} %",
            f"{r['workers_cpu_ms_per_grant']:.2f} ms",
            f"{r['started_twice']} ({r['left_processing']} left)",
        ]
        for r in result["results"]
    ]


ROW_HEADERS = ["clients", "rows", "reservations / s", "latency (ms)", "vs a row per client"]


def row_rows(result: dict[str, Any]) -> list[list[str]]:
    alone = result.get("row_alone", [])
    spread = {r["clients"]: r["reservations_per_second"] for r in alone}
    return [
        [
            str(r["clients"]),
            "one (the fleet's)" if r["rows"] == 1 else f"{r['rows']} (one per client)",
            f"{r['reservations_per_second']:,.0f}",
            f"{r['latency_ms']:.2f}",
            f"{r['reservations_per_second'] / spread[r['clients']]:.2f}x",
        ]
        for r in alone
    ]


def report(result: dict[str, Any]) -> str:
    title = f"{result['processes']} processes sharing one budget (instant handler)"
    if result.get("concurrency"):
        title += f", WORKER_CONCURRENCY={result['concurrency']}"
    table(title, HEADERS, rows(result))
    text = markdown_table(HEADERS, rows(result)) + "\n"
    if result.get("row_alone"):
        table(
            "the limiter's row alone (pgbench, one slot a statement)", ROW_HEADERS, row_rows(result)
        )
        text += "\n" + markdown_table(ROW_HEADERS, row_rows(result)) + "\n"
    return text


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 4)
    versions = dict.fromkeys(r.get("version", "listener") for r in result["results"])
    for version in versions:
        mine = [r for r in result["results"] if r.get("version", "listener") == version]
        ax.plot(
            [r["rpm"] for r in mine],
            [r["budget_used_percent"] for r in mine],
            "o-",
            label=version,
        )
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
    parser.add_argument("--baseline", metavar="DIR", help="another `listener`, as in bench.peers")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="WORKER_CONCURRENCY (default: the default)"
    )
    args = parser.parse_args()
    timed(
        lambda quick: publish(
            NAME, run(quick, args.budgets, args.baseline, args.concurrency), report, plot
        ),
        args.quick,
    )


if __name__ == "__main__":
    main()
