"""3. The budget, end to end: `python -m listener worker` processes against the stub at 450 RPM
(0.3 s per request) with 20 backlogged stores, for 1, 2 and 4 processes sharing the limiter.

Measured over a fixed window from the first completion: items completed per minute against the
configured limit, 429s the stub sent, the busiest 60 s window the stub saw, Jain's fairness
index of the 20 stores' completed items in each minute, and the connections the processes held
(pg_stat_activity, sampled every second).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from bench.common import (
    connections,
    console,
    jain,
    load_in_chunks,
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    query,
    save_figure,
    scratch_database,
    spawn_worker,
    stop_processes,
    stub_process,
    table,
    timed,
    wait_workers_ready,
)

NAME = "budget"
RPM = 450
LATENCY = 0.3
STORES = [f"store-{n:02d}" for n in range(20)]
CONCURRENCY = 16
BUCKET = 5.0  # seconds per point of the throughput plot


def run_one(processes: int, seconds: float, bar: Any) -> dict[str, Any]:
    per_store = int(RPM * seconds / 60 / len(STORES) * 2) + 100  # never drains in the window
    with scratch_database(f"budget_{processes}") as url, stub_process(RPM, LATENCY) as stub:
        load_in_chunks(url, STORES, per_store, bar)
        env = {"RATE_LIMIT_RPM": str(RPM), "WORKER_CONCURRENCY": str(CONCURRENCY)}
        procs = [spawn_worker(url, stub.base_url, **env) for _ in range(processes)]
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(connections(url))

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            wait_workers_ready(url, procs)
            sampler.start()
            task = bar.add_task(f"{processes} process(es)", total=int(seconds))
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds + 2:
                bar.update(task, completed=min(int(elapsed), int(seconds)))
                time.sleep(0.5)
            bar.remove_task(task)
        finally:
            done.set()
            stop_processes(procs)
        stats = stub.stats()
        rows = query(url, "completions")
    return analyse(processes, seconds, rows, stats, samples)


def analyse(
    processes: int,
    seconds: float,
    rows: list[tuple[Any, ...]],
    stub: dict[str, Any],
    samples: list[int],
) -> dict[str, Any]:
    start = min(at for _store, _claimed, at in rows)
    done = [(str(store), at - start) for store, _claimed, at in rows if at - start < seconds]
    window = min(60.0, seconds)
    windows: list[dict[str, Any]] = []
    for k in range(int(seconds // window)):
        per_store = Counter(s for s, t in done if k * window <= t < (k + 1) * window)
        counts = [per_store.get(store, 0) for store in STORES]
        windows.append(
            {"from": k * window, "items": sum(counts), "jain": jain(counts), "per_store": counts}
        )
    buckets = Counter(int(t // BUCKET) for _s, t in done)
    per_minute = len(done) / seconds * 60
    return {
        "processes": processes,
        "seconds": seconds,
        "items": len(done),
        "items_per_minute": per_minute,
        "percent_of_limit": 100 * per_minute / RPM,
        "rate_limited": stub["rate_limited_total"],
        "max_requests_in_any_60s": stub["max_requests_in_any_window"],
        "requests_total": stub["requests_total"],
        "jain_window_seconds": window,
        "windows": windows,
        "jain_min": min(float(w["jain"]) for w in windows),
        "connections_max": max(samples, default=0),
        "connections_samples": len(samples),
        "rate_series": [
            [k * BUCKET, buckets.get(k, 0) * 60 / BUCKET] for k in range(int(seconds // BUCKET))
        ],
    }


def run(quick: bool) -> dict[str, Any]:
    plan = [(1, 60.0), (4, 30.0)] if quick else [(1, 120.0), (2, 120.0), (4, 120.0)]
    results = []
    with progress() as bar:
        for processes, seconds in plan:
            results.append(run_one(processes, seconds, bar))
    return {
        "quick": quick,
        "rpm": RPM,
        "stub_latency": LATENCY,
        "stores": len(STORES),
        "worker_concurrency": CONCURRENCY,
        "results": results,
        "note": "quick mode: 60 s for 1 process, 30 s for 4 (Jain's index per 30 s), none for 2"
        if quick
        else "",
    }


HEADERS = [
    "processes",
    "window",
    "items/min",
    "% of 450",
    "429s",
    "max in any 60 s",
    "Jain min",
    "connections max",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(r["processes"]),
            f"{r['seconds']:.0f} s",
            f"{r['items_per_minute']:.1f}",
            f"{r['percent_of_limit']:.1f} %",
            str(r["rate_limited"]),
            str(r["max_requests_in_any_60s"]),
            f"{r['jain_min']:.4f}",
            str(r["connections_max"]),
        ]
        for r in result["results"]
    ]


def report(result: dict[str, Any]) -> str:
    table("The budget at 450 RPM, 20 backlogged stores", HEADERS, rows(result))
    line = "targets: >= 98 % of the limit, 0 429s, Jain >= 0.99 in every minute"
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    for r in result["results"]:
        xs = [x for x, _y in r["rate_series"]]
        ys = [y for _x, y in r["rate_series"]]
        ax.plot(xs, ys, marker=".", label=f"{r['processes']} process(es)")
    ax.axhline(RPM, color="k", linestyle="--", linewidth=1, label=f"limit {RPM} RPM")
    ax.axhline(RPM * 0.98, color="grey", linestyle=":", linewidth=1, label="98 % of the limit")
    ax.set_ylim(0, RPM * 1.2)
    ax.set_xlabel("seconds since the first completion")
    ax.set_ylabel(f"items completed per minute ({BUCKET:.0f} s buckets)")
    ax.set_title("Budget use at 450 RPM, 20 stores")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
