"""8. Database work per completed item: transactions, statements and WAL, at saturation and at
450 RPM, for listener at its defaults (and pgqueuer and Graphile Worker at its performance
settings at saturation, for scale: Graphile deletes a job when it completes it).

The figures are deltas of `pg_stat_database` (this database's commits and rollbacks),
`pg_stat_statements` (statements executed: each is one round trip unless pipelined) and
`pg_stat_wal` (WAL records, full-page images, bytes), so they must not include anybody
else's work: the run starts a PostgreSQL server of its own (the machine's PostgreSQL binaries,
`pg_config --bindir`, as the `postgres` user when run as root) with pg_stat_statements loaded,
on a free port, and removes it at the end. Its settings are the server's defaults
(`synchronous_commit = on`, `fsync = on`).

Each phase: the backlog loaded and analyzed (else the worker's statistics watch would ANALYZE
it during the phase: a one-off write of pg_statistic, not work per item), `CHECKPOINT` (so
full-page images do not depend on where the last one fell), counters reset and read, the worker
process started, the items done, the worker stopped (its backends' statistics are flushed when
they exit), the counters read again.
The harness's own polls are tagged (`bench-poll`) and taken off.

Where the WAL goes: each phase's WAL read back with pg_walinspect (contrib, shipped with the
server), by the relation of each record's first block: the table, each index, the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

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
from bench.peer_systems import STORES, PeerProcess, block, install, load, scalar
from listener.migrate import MigrationRunner

NAME = "db_work"


@contextlib.contextmanager
def private_server(max_connections: int = 50) -> Iterator[str]:
    """A throwaway PostgreSQL with pg_stat_statements; its admin URL."""
    bindir = Path(subprocess.check_output(["pg_config", "--bindir"], text=True).strip())
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="listener-db-work-"))
    data = root / "data"
    if as_postgres:
        shutil.chown(root, "postgres")
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
        check=True,
        **quiet,
    )
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        f"-c shared_preload_libraries=pg_stat_statements -c max_connections={max_connections}"
    )
    log = root / "server.log"
    pg_ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-o", options, "-l", str(log), "-w", "start"], check=True, **quiet)
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("CREATE EXTENSION pg_walinspect")
        yield admin
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=False, **quiet)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def wal_compression(admin: str, method: str) -> Iterator[None]:
    """The private server's `wal_compression` set to `method` for the block, then reset."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET wal_compression = '{method}'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_compression")
            conn.execute("SELECT pg_reload_conf()")


@contextlib.contextmanager
def database(admin: str, name: str, system: str) -> Iterator[str]:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin, dbname=name)
    if system == "listener":
        MigrationRunner(url, output=lambda _line: None).up()
    else:
        install(system, url)
    yield url


def by_statement(admin: str, name: str, items: int) -> list[tuple[float, str, float]]:
    """The statements run most, per item: where the round trips go; and each one's time in
    the server, in microseconds per item."""
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute(sql("peers")["by_statement"], {"dbname": name}).fetchall()
    per = max(1, items)
    return [(calls / per, query[:120], ms * 1000 / per) for calls, query, ms in rows]


def counters(admin: str, name: str) -> list[int]:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(sql("peers")["counters"], {"dbname": name}).fetchone()
    assert row is not None
    return [int(value) for value in row]


def measure(
    admin: str,
    url: str,
    system: str,
    wait: Any,
    source: str | None = None,
    preset: str | None = None,
    loaded: int | None = None,
    **settings: str,
) -> dict[str, Any]:
    """Counters around one worker process, per item it completed; `wait(url)` returns the polls
    it made once the phase is over."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_stat_statements_reset()")
    time.sleep(1.1)  # pg_stat_database is flushed by idle backends at most once a second
    before = counters(admin, str(name))
    start = scalar(admin, sql("peers")["wal_position"])
    started = time.monotonic()
    proc = PeerProcess(system, url, None, source, preset, **settings)
    try:
        proc.wait_for("ready", 60)
        polls = wait(url)
    finally:
        proc.stop()
    seconds = time.monotonic() - started
    time.sleep(1.1)
    after = counters(admin, str(name))
    stop = scalar(admin, sql("peers")["wal_position"])
    xacts, statements, records, fpi, wal = (b - a for a, b in zip(before, after, strict=True))
    xacts -= polls
    # Graphile keeps no completed job: its items are the jobs loaded (all gone, `until_done`).
    items = loaded if loaded is not None else int(scalar(url, block("done", system)))
    return {
        "items": items,
        "seconds": seconds,
        "transactions_per_item": xacts / items,
        "statements_per_item": statements / items,
        "wal_records_per_item": records / items,
        "wal_fpi_per_item": fpi / items,
        "wal_bytes_per_item": wal / items,
        "statements": by_statement(admin, str(name), items),
        "wal_by_relation": wal_by_relation(admin, url, start, stop, items),
    }


def wal_by_relation(admin: str, url: str, start: str, stop: str, items: int) -> list[list[Any]]:
    """[relation, records, bytes, of which full-page images] per item, largest first."""
    with psycopg.connect(url, autocommit=True) as conn:
        names = dict(conn.execute(sql("peers")["relation_names"]).fetchall())
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            sql("peers")["wal_by_relation"], {"start": start, "stop": stop}
        ).fetchall()
    return [
        [
            names.get(node, f"(another database: {node})") if node else "(no relation)",
            records / items,
            record_bytes / items,  # whole records, their full-page images included
            fpi_bytes / items,
        ]
        for node, records, record_bytes, fpi_bytes in rows
    ]


def until_done(system: str, items: int) -> Any:
    def wait(url: str) -> int:
        polls = 0
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                polls += 1
                if system == "graphile":
                    row = conn.execute(block("left", system)).fetchone()
                    if row and row[0] == 0:
                        return polls
                else:
                    row = conn.execute(block("done", system)).fetchone()
                    if row and row[0] >= items:
                        return polls
                time.sleep(0.2)

    return wait


def for_seconds(seconds: float) -> Any:
    def wait(url: str) -> int:
        time.sleep(seconds)
        return 0

    return wait


def run(quick: bool, baseline: str | None, phases_wanted: Sequence[str]) -> dict[str, Any]:
    items, paced_seconds = (5_000, 30.0) if quick else (20_000, 120.0)
    versions = [("listener", None)] + ([("listener BEFORE", baseline)] if baseline else [])
    phases: dict[str, dict[str, Any]] = {}
    with private_server() as admin:
        with database(admin, "work_listener", "listener") as url:
            for label, source in versions:
                if "saturation" not in phases_wanted:
                    break
                load("listener", url, items)
                phases[f"{label}, saturation"] = measure(
                    admin, url, "listener", until_done("listener", items), source
                )
            for label, source in versions:
                if "paced" not in phases_wanted:
                    break
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(block("reset", "listener"))
                    add_backlog(conn, STORES[:20], 1_000)
                    conn.execute("ANALYZE")  # as load() does: steady-state statistics
                phases[f"{label}, 450 RPM"] = measure(
                    admin, url, "listener", for_seconds(paced_seconds), source, RATE_LIMIT_RPM="450"
                )
            if "compressed" in phases_wanted:
                # The server's one lever on full-page images: the same two phases of this
                # version with them compressed (a setting of the server, not of the project).
                with wal_compression(admin, "lz4"):
                    load("listener", url, items)
                    phases["listener, saturation, wal_compression=lz4"] = measure(
                        admin, url, "listener", until_done("listener", items)
                    )
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(block("reset", "listener"))
                        add_backlog(conn, STORES[:20], 1_000)
                        conn.execute("ANALYZE")
                    phases["listener, 450 RPM, wal_compression=lz4"] = measure(
                        admin, url, "listener", for_seconds(paced_seconds), RATE_LIMIT_RPM="450"
                    )
        if "pgqueuer" in phases_wanted:
            with database(admin, "work_pgqueuer", "pgqueuer") as url:
                load("pgqueuer", url, items)
                phases["pgqueuer, saturation"] = measure(
                    admin, url, "pgqueuer", until_done("pgqueuer", items)
                )
        if "graphile" in phases_wanted:
            with database(admin, "work_graphile", "graphile") as url:
                load("graphile", url, items)
                phases["graphile (performance settings), saturation"] = measure(
                    admin,
                    url,
                    "graphile",
                    until_done("graphile", items),
                    preset="performance",
                    loaded=items,
                )
    return {"quick": quick, "baseline": baseline, "phases": phases}


HEADERS = [
    "phase",
    "items",
    "transactions/item",
    "statements/item",
    "WAL records/item",
    "FPI/item",
    "WAL bytes/item",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            phase,
            f"{p['items']:,}",
            f"{p['transactions_per_item']:.2f}",
            f"{p['statements_per_item']:.2f}",
            f"{p['wal_records_per_item']:.2f}",
            f"{p['wal_fpi_per_item']:.3f}",
            f"{p['wal_bytes_per_item']:,.0f}",
        ]
        for phase, p in result["phases"].items()
    ]


WAL_HEADERS = ["relation", "WAL records/item", "WAL bytes/item", "of which full-page images"]
WAL_ROWS = 10


def wal_rows(phase: dict[str, Any]) -> list[list[str]]:
    return [
        [relation, f"{records:.2f}", f"{size:,.0f}", f"{fpi:,.0f}"]
        for relation, records, size, fpi in phase.get("wal_by_relation", [])[:WAL_ROWS]
    ]


def report(result: dict[str, Any]) -> str:
    table("Database work per completed item", HEADERS, rows(result))
    text = markdown_table(HEADERS, rows(result)) + "\n"
    for phase, p in result["phases"].items():
        console.print(
            f"[dim]{phase}: "
            + "; ".join(f"{n:.3f}/item {us:.1f} µs/item {q[:60]}" for n, q, us in p["statements"])
        )
        statements = [[q[:90], f"{n:.4f}", f"{us:.1f} µs"] for n, q, us in p["statements"]]
        if statements and "compression" not in phase:
            text += (
                f"\n{phase}, the statements run most:\n\n"
                + markdown_table(["statement", "calls/item", "server time/item"], statements)
                + "\n"
            )
        if (
            phase.startswith("listener,")
            and "compression" not in phase
            and p.get("wal_by_relation")
        ):
            table(f"Where the WAL goes: {phase}", WAL_HEADERS, wal_rows(p))
            text += f"\n{phase}:\n\n" + markdown_table(WAL_HEADERS, wal_rows(p)) + "\n"
    return text


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(8, 4)
    phases = list(result["phases"])
    values = [result["phases"][p]["wal_bytes_per_item"] for p in phases]
    bars = ax.bar(phases, values, color="C0")
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.set_ylabel("WAL bytes per completed item")
    ax.set_title("Database work per item")
    save_figure(fig, NAME if not result["quick"] else f"{NAME}_quick")


PHASES = ("saturation", "paced", "compressed", "pgqueuer", "graphile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5,000 items; 30 s at 450 RPM")
    parser.add_argument("--baseline", metavar="DIR", help="another `listener`, as in bench.peers")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES)
    args = parser.parse_args()
    console.print("[dim]starting a PostgreSQL server of this run's own[/dim]")
    # A quick run writes db_work_quick.*: it never replaces a full run's committed figures.
    name = NAME if not args.quick else f"{NAME}_quick"
    timed(
        lambda quick: publish(name, run(quick, args.baseline, args.phases), report, plot),
        args.quick,
    )


if __name__ == "__main__":
    main()
