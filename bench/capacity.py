"""4. Raw capacity: the stub with no limit and no latency, RATE_LIMIT_RPM=0, items per second
for 1 and 2 worker processes; the same with an instant handler (no HTTP: the worker's own cost);
and the notification-to-start latency on an idle worker.

Throughput is the middle 80 % of the completions (10th to 90th percentile of completed_at), so
process start-up and the last stragglers do not count. The workers run with
WORKER_CONCURRENCY=64 and the other settings at their defaults.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio

from bench.common import (
    INSTANT_WORKER,
    LISTENER_WORKER,
    console,
    insert_store,
    load_in_chunks,
    markdown_table,
    ms,
    new_figure,
    parse_args,
    percentile,
    progress,
    publish,
    query,
    save_figure,
    scratch_database,
    spawn_worker,
    status_counts,
    stop_processes,
    stub_process,
    summary,
    table,
    timed,
    wait_workers_ready,
)
from bench.workers import TimingGenerator, bench_settings, running_worker

NAME = "capacity"
CONCURRENCY = 64
STORES = [f"store-{n:03d}" for n in range(100)]
HANDLERS = {"stub": LISTENER_WORKER, "instant": INSTANT_WORKER}


def throughput(handler: str, processes: int, items: int, bar: Any) -> dict[str, Any]:
    with scratch_database(f"capacity_{processes}") as url, stub_process() as stub:
        env = {"RATE_LIMIT_RPM": "0", "WORKER_CONCURRENCY": str(CONCURRENCY)}
        procs = [
            spawn_worker(url, stub.base_url, HANDLERS[handler], **env) for _ in range(processes)
        ]
        try:
            wait_workers_ready(url, procs)
            task = bar.add_task(f"{handler}, {processes} process(es)", total=items)
            load_in_chunks(url, STORES, items // len(STORES), analyze=False)
            deadline = time.monotonic() + 300
            while (done := status_counts(url).get("COMPLETED", 0)) < items:
                bar.update(task, completed=done)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {done} of {items} items done in 300 s")
                time.sleep(0.2)
            bar.remove_task(task)
        finally:
            stop_processes(procs)
        rows = query(url, "completions")
    claimed = [float(row[1]) for row in rows]
    completed = sorted(float(row[2]) for row in rows)
    low, high = percentile(completed, 10), percentile(completed, 90)
    middle = sum(1 for at in completed if low <= at <= high)
    return {
        "handler": handler,
        "processes": processes,
        "items": len(rows),
        "items_per_second": middle / (high - low),
        "wall_seconds": completed[-1] - min(claimed),
    }


async def idle_latency(trials: int) -> dict[str, Any]:
    """One item for a new store, on a worker with nothing to do: commit → first item started."""
    with scratch_database("capacity_idle") as url, stub_process() as stub:
        settings = bench_settings(stub.base_url, rate_limit_rpm=0)
        handler = TimingGenerator(settings)
        commits: dict[str, float] = {}
        async with running_worker(url, settings, handler):
            for trial in range(trials):
                store = f"idle-{trial}"
                started = handler.times.event(store)
                commits[store] = await insert_store(url, store, 1)
                with anyio.fail_after(10):
                    await started.wait()
                await anyio.sleep(random.uniform(0.05, 0.2))
        waits = [handler.times.first[store] - at for store, at in commits.items()]
    return summary(waits)


def run(quick: bool) -> dict[str, Any]:
    sizes = {"stub": 2_000, "instant": 10_000} if quick else {"stub": 10_000, "instant": 40_000}
    trials = 20 if quick else 100
    results = []
    with progress() as bar:
        task = bar.add_task("capacity", total=5)
        for handler, items in sizes.items():
            for processes in (1, 2):
                results.append(throughput(handler, processes, items, bar))
                bar.advance(task)
        bar.update(task, description="idle latency")
        idle = anyio.run(idle_latency, trials)
        bar.advance(task)
    return {
        "quick": quick,
        "worker_concurrency": CONCURRENCY,
        "results": results,
        "idle_start": idle,
    }


HEADERS = ["handler", "processes", "items", "items/s", "vs 1 process"]


def rows(result: dict[str, Any]) -> list[list[str]]:
    one = {r["handler"]: r["items_per_second"] for r in result["results"] if r["processes"] == 1}
    return [
        [
            "stub (HTTP)" if r["handler"] == "stub" else "instant (no HTTP)",
            str(r["processes"]),
            f"{r['items']:,}",
            f"{r['items_per_second']:,.0f}",
            f"{r['items_per_second'] / one[r['handler']]:.2f}x",
        ]
        for r in result["results"]
    ]


def report(result: dict[str, Any]) -> str:
    table("Raw capacity (no limit, no latency)", HEADERS, rows(result))
    idle = result["idle_start"]
    line = (
        f"idle worker, insert commit → first item started: p50 {ms(idle['p50'])}, "
        f"p99 {ms(idle['p99'])} ({idle['n']} trials)"
    )
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 4)
    labels = [f"{r['handler']}\n{r['processes']} proc" for r in result["results"]]
    values = [r["items_per_second"] for r in result["results"]]
    colors = ["C0" if r["handler"] == "stub" else "C2" for r in result["results"]]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.set_ylabel("items per second")
    idle = result["idle_start"]
    ax.set_title(
        f"Raw capacity on 2 cores; idle start p50 {ms(idle['p50'])}, p99 {ms(idle['p99'])}"
    )
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
