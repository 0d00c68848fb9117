"""5. Many stores: 10,000 stores submit 5 items each, 100 stores per statement, as fast as the
database takes them, while one `worker` process runs (no rate limit, WORKER_CONCURRENCY=64).

Measured: the time from the first insert's commit to the last completion, and when each store's
first item started (claimed_at: the worker claims an item only for a worker that starts it at
once), relative to the first commit and to the store's own commit. Round robin shows as the
number of distinct stores among the first 10,000 items claimed. Run with the instant handler
(the worker's own cost) and, in the full run, with the stub (HTTP, no limit, no latency).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.common import (
    INSTANT_WORKER,
    LISTENER_WORKER,
    add_backlog,
    console,
    markdown_table,
    new_figure,
    parse_args,
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

NAME = "many_stores"
STORES = 10_000
ITEMS = 5
PER_STATEMENT = 100
CONCURRENCY = 64
HANDLERS = {"instant": INSTANT_WORKER, "stub": LISTENER_WORKER}


def run_one(handler: str, bar: Any) -> dict[str, Any]:
    stores = [f"store-{n:05d}" for n in range(STORES)]
    total = STORES * ITEMS
    with scratch_database("many") as url, stub_process() as stub:
        env = {"RATE_LIMIT_RPM": "0", "WORKER_CONCURRENCY": str(CONCURRENCY)}
        procs = [spawn_worker(url, stub.base_url, HANDLERS[handler], **env)]
        commits: dict[str, float] = {}
        try:
            wait_workers_ready(url, procs)
            task = bar.add_task(f"{handler}: {STORES:,} stores x {ITEMS}", total=total)
            with psycopg.connect(url, autocommit=True) as conn:
                for start in range(0, STORES, PER_STATEMENT):
                    part = stores[start : start + PER_STATEMENT]
                    add_backlog(conn, part, ITEMS)
                    commits.update(dict.fromkeys(part, time.time()))
            deadline = time.monotonic() + 600
            while (done := status_counts(url).get("COMPLETED", 0)) < total:
                bar.update(task, completed=done)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {done} of {total} items done in 600 s")
                time.sleep(0.25)
            bar.remove_task(task)
        finally:
            stop_processes(procs)
        per_store = query(url, "store_summary")
        order = [str(store) for (store,) in query(url, "claim_order", {"n": STORES})]
    first_commit = min(commits.values())
    first_start = {str(s): float(claimed) for s, claimed, _done, _n in per_store}
    last_done = [float(done) - first_commit for _s, _claimed, done, _n in per_store]
    since_commit = [at - commits[s] for s, at in first_start.items()]
    since_first = sorted(at - first_commit for at in first_start.values())
    finish = max(last_done)
    return {
        "handler": handler,
        "stores": STORES,
        "items": total,
        "inserting_seconds": max(commits.values()) - first_commit,
        "finish_seconds": finish,
        "items_per_second": total / finish,
        "first_start_since_own_commit": summary(since_commit),
        "first_start_since_first_commit": summary(since_first),
        "last_completion_since_first_commit": summary(last_done),
        "distinct_stores_in_first_claims": len(set(order)),
        "first_start_cdf": since_first[:: max(1, len(since_first) // 500)],
        "last_completion_cdf": sorted(last_done)[:: max(1, len(last_done) // 500)],
    }


def run(quick: bool) -> dict[str, Any]:
    handlers = ["instant"] if quick else ["instant", "stub"]
    with progress() as bar:
        results = [run_one(handler, bar) for handler in handlers]
    return {
        "quick": quick,
        "stores": STORES,
        "items_per_store": ITEMS,
        "worker_concurrency": CONCURRENCY,
        "results": results,
        "note": "quick mode: the instant handler only" if quick else "",
    }


HEADERS = [
    "handler",
    "finish",
    "items/s",
    "first start p50",
    "first start p99",
    "first start max",
    "after own insert p99",
    "stores in first 10k claimed",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["results"]:
        first, own = r["first_start_since_first_commit"], r["first_start_since_own_commit"]
        out.append(
            [
                r["handler"],
                f"{r['finish_seconds']:.1f} s",
                f"{r['items_per_second']:,.0f}",
                f"{first['p50']:.2f} s",
                f"{first['p99']:.2f} s",
                f"{first['max']:.2f} s",
                f"{own['p99']:.2f} s",
                f"{r['distinct_stores_in_first_claims']:,}",
            ]
        )
    return out


def report(result: dict[str, Any]) -> str:
    title = f"{STORES:,} stores x {ITEMS} items, 1 worker process, no limit"
    table(title, HEADERS, rows(result))
    line = "first start: seconds from the first insert's commit to each store's first item"
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    for k, r in enumerate(result["results"]):
        for key, style, what in (
            ("first_start_cdf", "-", "first item started"),
            ("last_completion_cdf", "--", "last item completed"),
        ):
            xs = r[key]
            ys = [100 * (i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, style, color=f"C{k}", label=f"{r['handler']}: {what}")
    ax.set_xlabel("seconds since the first store's insert committed")
    ax.set_ylabel(f"% of the {STORES:,} stores")
    ax.set_title(f"{STORES:,} stores x {ITEMS} items: per-store first start and last completion")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
