"""27. Producers' commits and the notify lock: one job of one item per transaction over 1,000
stores, by pgbench, at 4, 32 and 128 clients (issue 25).

Every transaction that sends a NOTIFY takes one database-wide lock at commit and holds it through
its WAL flush, so notifying commits cannot share a flush. Two schemas side by side on a server of
the run's own (128 clients need more than the machine server's 100 connections): `before`, the
migrations up to the one that announces a store once (`1730000030000_ready-notify-once`), and
`after`, all of them. Each in four modes: every trigger on; the notifying trigger
(`job_items_notify_insert`) disabled; the fill triggers disabled too (what is left: the foreign
key's); every trigger off (`session_replication_role = replica`). Runs interleaved: each round
runs every (clients, schema, mode) once, in an order rotated per round, so the machine's load
falls on all of them.

The pgbench transaction is what `listener.enqueue` sends for a one-item job: the job row, then
its item with the job's priority and kind (so the fill triggers' WHEN clauses skip them, as they
do for the producer's COPY). The `after` schema's stores are announced once, before the first
round, as a backlog leaves them: no worker drains them here, so its commits take no notify lock.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from bench.common import (
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    save_figure,
    summary,
    table,
    timed,
)
from bench.db_work import private_server
from listener.migrate import MigrationRunner, load_migrations

NAME = "notify_commits"
STORES = 1_000
CLIENTS = (4, 32, 128)
SCHEMAS = ("before", "after")
MODES = ("on", "notify_off", "fill_off", "all_off")
# The first migration of the `after` schema: `before` stops short of it.
AFTER_FROM = "1730000030000"
NOTIFY_TRIGGER = "job_items_notify_insert"
FILL_TRIGGERS = ("job_items_fill_instance_id", "job_items_fill_priority")
# The triggers each mode disables by name (`all_off` turns every trigger off for its sessions).
DISABLED = {
    "on": (),
    "notify_off": (NOTIFY_TRIGGER,),
    "fill_off": (NOTIFY_TRIGGER, *FILL_TRIGGERS),
    "all_off": (),
}

SCRIPT = Path(__file__).with_suffix(".pgbench")


def schema(admin: str, which: str) -> str:
    name = f"notify_{which}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin, dbname=name)
    migrations = load_migrations()
    if which == "before":
        migrations = [m for m in migrations if m.name < AFTER_FROM]
    MigrationRunner(url, output=lambda _line: None, migrations=migrations).up()
    return url


def set_triggers(url: str, names: tuple[str, ...], enabled: bool) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            conn.execute(f"ALTER TABLE job_items {verb} TRIGGER {name}")


def postmaster_pid(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # While the session lives: its backend's parent is the postmaster.
        return int(Path(f"/proc/{row[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])


def server_cpu(postmaster: int) -> float:
    """CPU seconds the server has used: the postmaster's own and its reaped children's (the
    backends of finished runs), and its live children's (background processes). Unlike the
    throughput, this does not move with the machine's other work."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
        try:
            mine = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # ended meanwhile: counted in cutime once reaped
        total += int(mine[11]) + int(mine[12])
    return total / ticks


def wait_for_clients_gone(url: str) -> None:
    """The run's backends ended and reaped, so their CPU is in the postmaster's cutime."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(200):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row == (0,):
                return
            time.sleep(0.05)


def pgbench(url: str, clients: int, seconds: int, mode: str) -> dict[str, float]:
    env = dict(os.environ)
    if mode == "all_off":
        env["PGOPTIONS"] = "-c session_replication_role=replica"
    command = ["pgbench", "-n", "-M", "prepared", "-j", "2", "-c", str(clients)]
    command += ["-T", str(seconds), "-D", f"stores={STORES}", "-f", str(SCRIPT), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    tps = re.search(r"tps = ([\d.]+)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if tps is None or latency is None or done is None:
        raise RuntimeError(f"pgbench said: {out}")
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)),
        "transactions": int(done.group(1)),
    }


def notifications(url: str) -> int:
    """Items whose store was announced: the rows of the `after` schema's ready table."""
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT to_regclass('announced_stores') IS NOT NULL").fetchone()
        if not found or not found[0]:
            return 0
        row = conn.execute("SELECT count(*) FROM announced_stores").fetchone()
    return int(row[0]) if row else 0


def run(quick: bool) -> dict[str, Any]:
    rounds, seconds = (2, 4) if quick else (5, 8)
    runs: list[dict[str, Any]] = []
    cases = [(c, s, m) for c in CLIENTS for s in SCHEMAS for m in MODES]
    with private_server(max_connections=CLIENTS[-1] + 20) as admin:
        urls = {which: schema(admin, which) for which in SCHEMAS}
        postmaster = postmaster_pid(admin)
        for url in urls.values():
            # Warm-up: the caches, and every store announced once in `after`.
            pgbench(url, 8, 3, "on")
        announced = notifications(urls["after"])
        with progress() as bar:
            task = bar.add_task("pgbench runs", total=rounds * len(cases))
            for round_ in range(rounds):
                shift = round_ * 7 % len(cases)
                for clients, which, mode in cases[shift:] + cases[:shift]:
                    url = urls[which]
                    set_triggers(url, DISABLED[mode], False)
                    wait_for_clients_gone(url)
                    cpu = server_cpu(postmaster)
                    try:
                        figures = pgbench(url, clients, seconds, mode)
                    finally:
                        set_triggers(url, DISABLED[mode], True)
                    wait_for_clients_gone(url)
                    used = server_cpu(postmaster) - cpu
                    figures["server_cpu_us"] = 1e6 * used / max(1, figures["transactions"])
                    runs.append(
                        {"round": round_, "clients": clients, "schema": which, "mode": mode}
                        | figures
                    )
                    bar.advance(task)
    result: dict[str, Any] = {
        "quick": quick,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "stores": STORES,
        "announced_stores_after_warm_up": announced,
        "runs": runs,
        "cases": cases_summary(runs),
        "note": "pgbench -M prepared -j 2 on a private server (fsync on, synchronous_commit on); "
        "2 cores shared with other work, so read the ratios within a round, not the absolute "
        "figures",
    }
    table(f"{NAME}: transactions a second (median of {rounds} rounds)", HEADERS, rows(result))
    return result


def cases_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for clients in CLIENTS:
        for which in SCHEMAS:
            case: dict[str, Any] = {"clients": clients, "schema": which}
            for mode in MODES:
                mine = [r for r in runs if (r["clients"], r["schema"], r["mode"]) == (
                    clients, which, mode)]  # fmt: skip
                case[mode] = summary([r["tps"] for r in mine])["p50"]
                case[f"{mode}_latency_ms"] = summary([r["latency_ms"] for r in mine])["p50"]
                case[f"{mode}_cpu_us"] = summary([r["server_cpu_us"] for r in mine])["p50"]
            # Ratios within each round (side by side), then their median.
            for mode in MODES[1:]:
                ratios = []
                for round_ in sorted({r["round"] for r in runs}):
                    by = {
                        r["mode"]: r["tps"]
                        for r in runs
                        if (r["round"], r["clients"], r["schema"]) == (round_, clients, which)
                    }
                    if by.get(mode):
                        ratios.append(by["on"] / by[mode])
                case[f"on_vs_{mode}"] = summary(ratios)["p50"]
            out.append(case)
    return out


HEADERS = [
    "clients",
    "schema",
    "triggers on",
    "notify trigger off",
    "+ fill triggers off",
    "all triggers off",
    "on / notify off",
    "on / fill off",
    "on / all off",
    "latency on",
    "server CPU a transaction: on / notify off / fill off / all off",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(c["clients"]),
            c["schema"],
            f"{c['on']:,.0f}",
            f"{c['notify_off']:,.0f}",
            f"{c['fill_off']:,.0f}",
            f"{c['all_off']:,.0f}",
            f"{c['on_vs_notify_off']:.2f}",
            f"{c['on_vs_fill_off']:.2f}",
            f"{c['on_vs_all_off']:.2f}",
            f"{c['on_latency_ms']:.1f} ms",
            " / ".join(f"{c[f'{mode}_cpu_us']:,.0f}" for mode in MODES) + " µs",
        ]
        for c in result["cases"]
    ]


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result))


def plot(result: dict[str, Any], name: str = NAME) -> None:
    fig, ax = new_figure()
    width = 0.1
    for offset, (which, mode) in enumerate((s, m) for s in SCHEMAS for m in MODES):
        values = [
            next(c[mode] for c in result["cases"] if (c["clients"], c["schema"]) == (n, which))
            for n in CLIENTS
        ]
        xs = [i + (offset - 3.5) * width for i in range(len(CLIENTS))]
        ax.bar(xs, values, width, label=f"{which}: {mode.replace('_', ' ')}")
    ax.set_xticks(range(len(CLIENTS)), [f"{n} clients" for n in CLIENTS])
    ax.set_ylabel("one-item jobs committed a second")
    ax.set_title("Producers' commits: before and after, triggers on / notify off / all off")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, name)


def main() -> None:
    args = parse_args(__doc__)
    result = timed(run, args.quick)
    # A quick run keeps its own file: the committed full run's figures stay.
    name = f"{NAME}_quick" if args.quick else NAME
    publish(name, result, report, lambda done: plot(done, name))


if __name__ == "__main__":
    main()
