"""7. Peers side by side: listener, Graphile Worker (Node), pgqueuer and procrastinate on the same
PostgreSQL, the same no-op jobs, interleaved, 3 repetitions; ratios against Graphile Worker at
its performance page's settings (concurrency 24, pool 25, local queue 500, batched completion)
with as many processes, or against pgqueuer at its defaults when Graphile did not run.

Each system runs on its own scratch database of the same server, as worker processes of its own
(`python -m bench.peer_workers`; Graphile: `node bench/graphile_worker.mjs`, installed by npm
into a scratch folder). Per repetition, in a rotating order, for each configuration: the backlog
is loaded (100,000 jobs, 20,000 with --quick; listener's spread over 100 stores; Graphile's
through its own `add_jobs`), the worker processes start, and throughput is jobs / (last
completion committed - first job started): start-up is left out, the last write is in. (Graphile
deletes a completed job and keeps no completion time: its last completion is when the harness
first sees its table empty, polled every 2 ms near the end.) Then the idle pickup: one process
with nothing to do, one job inserted, commit returned -> handler started (same host, same
clock), on an otherwise idle machine. (Not beside a busy core: there the harness's own process,
woken by its commit's answer, runs late, and the figure shrinks by that delay, not by anything
the systems do.) Then listener alone: a 10-store backlog, Jain's index of the stores'
completions in each full second.

`pip install -e '.[peers]'` installs the pinned peers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.common import (
    add_backlog,
    console,
    jain,
    markdown_table,
    ms,
    new_figure,
    publish,
    save_figure,
    scratch_database,
    sql,
    summary,
    table,
    timed,
)
from bench.peer_systems import (
    GRAPHILE_VERSION,
    SYSTEMS,
    PeerProcess,
    backend_cpu,
    block,
    cpu_seconds,
    install,
    load,
    node_version,
    procrastinate_app,
    scalar,
)
from bench.peer_workers import PGQUEUER_ENTRYPOINT, PROCRASTINATE_TASK

NAME = "peers"
FAIR_STORES = [f"fair-{n}" for n in range(10)]
FAIR_JOBS_QUICK, FAIR_JOBS = 40_000, 100_000  # about 5 s and 12 s of work at full speed


@dataclass(frozen=True)
class Config:
    system: str
    processes: int
    concurrency: int | None  # None: the system's default
    label: str
    source: str | None = None  # another checkout's listener (--baseline): before and after
    preset: str | None = None  # Graphile's: "performance" or "defaults"


def baseline_configs(source: str) -> list[Config]:
    """listener at its defaults as it was in `source`, for before/after in the same run."""
    return [
        Config("listener", 1, None, "listener BEFORE, defaults, 1 process", source),
        Config("listener", 2, None, "listener BEFORE, defaults, 2 processes", source),
    ]


CONFIGS = [
    Config("listener", 1, None, "listener, defaults (concurrency 64), 1 process"),
    Config("listener", 2, None, "listener, defaults (concurrency 64), 2 processes"),
    Config("listener", 1, 16, "listener, concurrency 16 (the old default), 1 process"),
    Config("pgqueuer", 1, None, "pgqueuer 1.6.0, defaults, 1 process"),
    Config("pgqueuer", 2, None, "pgqueuer 1.6.0, defaults, 2 processes"),
    Config("procrastinate", 1, None, "procrastinate 3.10.0, concurrency 10, 1 process"),
    *(
        Config(
            "graphile",
            n,
            None,
            f"graphile {GRAPHILE_VERSION}, {label}, {n} process{es}",
            None,
            preset,
        )
        for preset, label in (
            ("performance", "performance settings"),
            ("defaults", "defaults (concurrency 1)"),
        )
        for n, es in ((1, ""), (2, "es"))
    ),
]
GRAPHILE_PERFORMANCE = {c.processes: c.label for c in CONFIGS if c.preset == "performance"}


def throughput(config: Config, url: str, jobs: int) -> dict[str, float]:
    """Jobs per second, and CPU per 1,000 jobs of the worker processes and of their database
    sessions (robust where the wall clock is not: the machine is shared)."""
    load(config.system, url, 0)
    procs = [
        PeerProcess(config.system, url, config.concurrency, config.source, config.preset)
        for _ in range(config.processes)
    ]
    try:
        for proc in procs:
            proc.wait_for("ready", 60)
        before = cpu_seconds([p.process.pid for p in procs]), backend_cpu(url)
        load(config.system, url, jobs, reset=False, analyze=False)
        deadline = time.monotonic() + 600
        last = _wait_drained(config, url, jobs, procs, deadline)
        worker_cpu = cpu_seconds([p.process.pid for p in procs]) - before[0]
        sessions = backend_cpu(url)
        db_cpu = sum(cpu - before[1].get(pid, 0.0) for pid, cpu in sessions.items())
        for proc in procs:
            proc.drain()
    finally:
        for proc in procs:
            proc.stop()
    first = min(p.first for p in procs if p.first is not None)
    if last is None:
        last = float(scalar(url, block("last_done", config.system)))
    return {
        "rate": jobs / (last - first),
        "worker_cpu_ms_per_1k": worker_cpu * 1e6 / jobs,
        "db_cpu_ms_per_1k": db_cpu * 1e6 / jobs,
    }


def _wait_drained(
    config: Config, url: str, jobs: int, procs: list[PeerProcess], deadline: float
) -> float | None:
    """Wait until every job is done; for Graphile, which keeps no completion time, the time
    the harness first saw its table empty (None: read the system's own last completion)."""

    def check() -> None:
        if time.monotonic() > deadline or any(p.process.poll() is not None for p in procs):
            raise RuntimeError(f"{config.label}: the backlog did not drain")

    if config.system != "graphile":
        while scalar(url, block("done", config.system)) < jobs:
            check()
            time.sleep(0.1)
        return None
    # One connection, named so that backend_cpu leaves it out; the cheap probe near the end.
    with psycopg.connect(url, autocommit=True, application_name="bench-poll") as conn:
        while (conn.execute(block("left", "graphile")).fetchone() or (0,))[0] > jobs // 50:
            check()
            time.sleep(0.05)
        while (conn.execute(block("any_left", "graphile")).fetchone() or (False,))[0]:
            check()
            time.sleep(0.002)
        return time.time()


# -- idle pickup ------------------------------------------------------------------------------


async def _insert_probe(
    system: str, conn: psycopg.AsyncConnection[Any], app: Any, key: str
) -> float:
    """One job, as each system's clients enqueue it; the time its commit returned."""
    if system == "listener":
        await conn.execute(sql("queries")["add_backlog"], {"stores": [key], "counts": [1]})
    elif system == "pgqueuer":
        from pgqueuer import Queries

        await Queries.from_psycopg_connection(conn).enqueue(PGQUEUER_ENTRYPOINT, key.encode())
    elif system == "graphile":
        await conn.execute(sql("peers")["add_job_graphile"], {"key": key})
    else:
        await app.tasks[PROCRASTINATE_TASK].defer_async(key=key)
    return time.time()


def idle_pickup(
    system: str, url: str, trials: int, source: str | None = None, preset: str | None = None
) -> list[float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(block("reset", system))
    proc = PeerProcess(system, url, None, source, preset)

    async def go() -> list[float]:
        waits = []
        app = procrastinate_app(url)
        async with (
            await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
            app.open_async(),
        ):
            # Ready is when a first job goes through: each system's own start-up is not timed.
            await _insert_probe(system, conn, app, "probe-warmup")
            await asyncio.to_thread(proc.wait_for, "probe probe-warmup", 60)
            for trial in range(trials):
                await asyncio.sleep(random.uniform(0.05, 0.2))
                key = f"probe-{trial}"
                committed = await _insert_probe(system, conn, app, key)
                await asyncio.to_thread(proc.wait_for, f"probe {key} ", 30)
                waits.append(proc.probes[key] - committed)
        return waits

    try:
        proc.wait_for("ready", 60)
        return asyncio.run(go())
    finally:
        proc.stop()


# -- fairness at full speed (listener) --------------------------------------------------------


def fairness(url: str, jobs: int) -> dict[str, Any]:
    """10 stores' backlog of `jobs` items at the defaults: Jain's index of their completions in
    each full second while every store still had work (the backlog must last several seconds
    at full speed: the throughput runs' 5,000 jobs last under two)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(block("reset", "listener"))
        add_backlog(conn, FAIR_STORES, jobs // len(FAIR_STORES))
        conn.execute("ANALYZE")
    proc = PeerProcess("listener", url, None)
    try:
        proc.wait_for("ready", 60)
        while scalar(url, block("done", "listener")) < jobs:
            time.sleep(0.1)
    finally:
        proc.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(sql("peers")["completions_per_store"]).fetchall()
    per_second: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FAIR_STORES, 0))
    last_of: dict[str, float] = {}
    for store, at in rows:
        per_second[int(at)][store] += 1
        last_of[store] = max(last_of.get(store, 0.0), at)
    start, stop = min(per_second), int(min(last_of.values()))  # full seconds, all stores busy
    seconds = [list(per_second[s].values()) for s in range(start + 1, stop)]
    worst = min(seconds, key=jain, default=[])
    return {
        "seconds": len(seconds),
        "min_jain": jain(worst) if worst else math.nan,
        "items_in_worst_second": sum(worst),
    }


# -- the run ----------------------------------------------------------------------------------


def run(
    quick: bool,
    baseline: str | None = None,
    systems: Sequence[str] = SYSTEMS,
    reps: int | None = None,
) -> dict[str, Any]:
    jobs, default_reps, trials = (20_000, 1, 20) if quick else (100_000, 3, 100)
    reps = reps or default_reps
    configs = [c for c in CONFIGS if c.system in systems]
    configs += baseline_configs(baseline) if baseline else []
    idle_runs: list[tuple[str, str, str | None, str | None]] = [
        (system, system, None, None) for system in systems if system != "graphile"
    ]
    if "graphile" in systems:
        idle_runs += [
            (f"graphile ({preset})", "graphile", None, preset)
            for preset in ("performance", "defaults")
        ]
    if baseline:
        idle_runs.append(("listener BEFORE", "listener", baseline, None))
    rates: dict[str, list[dict[str, float]]] = defaultdict(list)
    processes = {config.label: config.processes for config in configs}
    idle: dict[str, list[float]] = defaultdict(list)
    fair: list[dict[str, Any]] = []
    with (
        scratch_database("peers_listener") as listener_url,
        scratch_database("peers_pgqueuer") as pgqueuer_url,
        scratch_database("peers_procrastinate") as procrastinate_url,
        scratch_database("peers_graphile") as graphile_url,
    ):
        urls = {"listener": listener_url, "pgqueuer": pgqueuer_url}
        urls["procrastinate"] = procrastinate_url
        urls["graphile"] = graphile_url
        for system in set(systems):
            install(system, urls[system])
        for rep in range(reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for config in order:
                rate = throughput(config, urls[config.system], jobs)
                rates[config.label].append(rate)
                console.print(
                    f"rep {rep + 1}: {config.label}: {rate['rate']:,.0f} jobs/s, CPU per 1,000: "
                    f"worker {rate['worker_cpu_ms_per_1k']:,.0f} ms, "
                    f"database {rate['db_cpu_ms_per_1k']:,.0f} ms"
                )
            turn = rep % len(idle_runs)
            for name, system, source, preset in idle_runs[turn:] + idle_runs[:turn]:
                idle[name] += idle_pickup(system, urls[system], trials // reps, source, preset)
            fair.append(fairness(listener_url, FAIR_JOBS_QUICK if quick else FAIR_JOBS))
    return {
        "quick": quick,
        "baseline": baseline,
        "jobs": jobs,
        "repetitions": reps,
        "node": node_version() if "graphile" in systems else None,
        "throughput": {
            label: {
                "runs": [r["rate"] for r in runs],
                "processes": processes[label],
                "median": statistics.median(r["rate"] for r in runs),
                "worker_cpu_ms_per_1k": statistics.median(r["worker_cpu_ms_per_1k"] for r in runs),
                "db_cpu_ms_per_1k": statistics.median(r["db_cpu_ms_per_1k"] for r in runs),
            }
            for label, runs in rates.items()
        },
        "idle_pickup": {system: summary(waits) for system, waits in idle.items()},
        "fairness": {
            "runs": fair,
            **min(fair, key=lambda f: f["min_jain"]),
            "seconds": sum(f["seconds"] for f in fair),
        },
    }


def rows(result: dict[str, Any]) -> list[list[str]]:
    through = result["throughput"]
    # Against Graphile at its performance settings with as many processes; against pgqueuer at
    # its defaults when Graphile did not run; against listener's own first row when neither did.
    pgqueuer = {c.processes: c.label for c in CONFIGS if c.system == "pgqueuer"}

    def base(entry: dict[str, Any]) -> float:
        processes = entry.get("processes", 1)
        for peer in (GRAPHILE_PERFORMANCE, pgqueuer):
            label = peer.get(processes, peer[1])
            if label in through:
                return float(through[label]["median"])
        return float(next(iter(through.values()))["median"])

    return [
        [
            label,
            f"{entry['median']:,.0f}",
            " / ".join(f"{r:,.0f}" for r in entry["runs"]),
            f"{entry['median'] / base(entry):.2f}x",
            f"{entry['worker_cpu_ms_per_1k']:,.0f} ms",
            f"{entry['db_cpu_ms_per_1k']:,.0f} ms",
        ]
        for label, entry in through.items()
    ]


def idle_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [system, ms(v["p50"]), ms(v["p99"]), str(v["n"])]
        for system, v in result["idle_pickup"].items()
    ]


def report(result: dict[str, Any]) -> str:
    headers = [
        "configuration",
        "jobs/s (median)",
        "each run",
        "vs graphile perf. (or pgqueuer), same processes",
        "worker CPU / 1,000 jobs",
        "database CPU / 1,000 jobs",
    ]
    title = f"Peers: {result['jobs']:,} no-op jobs, {result['repetitions']} interleaved run(s)"
    table(title, headers, rows(result))
    idle_headers = [
        "system",
        "idle pickup p50",
        "p99",
        "trials (each)",
    ]
    table("Idle pickup: insert committed -> handler started", idle_headers, idle_rows(result))
    fair = result["fairness"]
    line = (
        f"listener at its defaults, 10-store backlog: lowest Jain's index over "
        f"{fair['seconds']} full second(s) = {fair['min_jain']:.4f} "
        f"({fair['items_in_worst_second']} items in that second)"
    )
    console.print(line)
    return (
        markdown_table(headers, rows(result))
        + "\n\n"
        + markdown_table(idle_headers, idle_rows(result))
        + f"\n\n{line}\n"
    )


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(9, 4.5)
    labels = [label.replace(", ", "\n", 1) for label in result["throughput"]]
    values = [entry["median"] for entry in result["throughput"].values()]
    colors = ["C0" if label.startswith("listener") else "C7" for label in labels]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("no-op jobs per second")
    ax.set_title(f"Peers side by side, {result['jobs']:,} jobs, median of {result['repetitions']}")
    save_figure(fig, NAME if not result["quick"] else f"{NAME}_quick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20,000 jobs, 1 run, 20 trials")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="a directory holding another version's `listener` package (e.g. `git archive "
        "<commit> listener | tar -x -C DIR`): its worker runs too, for before/after",
    )
    parser.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="default: all four"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: 1 quick, 3 full)")
    args = parser.parse_args()
    # A quick run writes peers_quick.*: it never replaces a full run's committed figures.
    name = NAME if not args.quick else f"{NAME}_quick"
    timed(
        lambda quick: publish(
            name, run(quick, args.baseline, args.systems, args.reps), report, plot
        ),
        args.quick,
    )


if __name__ == "__main__":
    main()
