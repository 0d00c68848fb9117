"""2. Store start latency: store A holds a backlog of 100,000 items and 1 / 10 / 100 / 1,000 other
stores are active (each with a backlog) when store B inserts 50 items. Measured: from B's insert
commit to B's first item claimed (claimed_at, the database's clock) and to its first item
started (the handler's call), for the project's worker and the old worker re-created, in the
same run, against the same stub at 450 RPM (0.3 s per request).

The project's worker runs B's trials one after the other (B's leftover items are deleted after
each, so the count of active stores holds). The old worker claims the oldest items first, so B
waits behind every item inserted before it: its B stores are inserted over one 5 s poll period,
and the phase ends once the old worker has claimed again after the last of them, which proves
that its claims passed B by. The wait it would have had is estimated from the items ahead of B
and the old worker's measured throughput.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import psycopg
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bench.common import (
    add_backlog,
    console,
    execute,
    insert_store,
    load_in_chunks,
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    query,
    save_figure,
    scratch_database,
    stub_process,
    summary,
    table,
    timed,
)
from bench.workers import OldWorker, TimingGenerator, bench_settings, running_worker

NAME = "start_latency"
RPM = 450
LATENCY = 0.3
A_BACKLOG = 100_000
B_ITEMS = 50
OLD_PHASE_LIMIT = 40.0


def other_backlog(count: int) -> int:
    """Enough for the trials at this count, whatever the count (about 100,000 rows at most)."""
    return max(100, 20_000 // count)


async def claimed_times(url: str, stores: list[str]) -> dict[str, float]:
    rows = await anyio.to_thread.run_sync(query, url, "first_claimed", {"stores": stores})
    return {str(store): float(at) for store, at in rows}


async def new_worker_trials(
    url: str, base_url: str, count: int, trials: int, give_up: float
) -> dict[str, Any]:
    settings = bench_settings(base_url, rate_limit_rpm=RPM)
    handler = TimingGenerator(settings)
    commits: dict[str, float] = {}
    async with running_worker(url, settings, handler):
        ready = time.time()
        await anyio.sleep(3.0)  # the worker is busy at the full budget before B arrives
        for trial in range(trials):
            store = f"new-{count}-{trial}"
            started = handler.times.event(store)
            commits[store] = await insert_store(url, store, B_ITEMS)
            with anyio.move_on_after(give_up):
                await started.wait()
            await anyio.to_thread.run_sync(execute, url, "drop_pending", {"stores": [store]})
            await anyio.sleep(random.uniform(0.1, 0.4))  # B lands anywhere between two slots
    claimed = await claimed_times(url, list(commits))
    result = _latencies(commits, claimed, handler.times.first, give_up)
    # When each trial ran (seconds since the worker was ready) and what it got (None: gave up).
    first = handler.times.first
    result["timeline"] = [
        [round(at - ready, 3), round(first[s] - at, 4) if s in first else None]
        for s, at in commits.items()
    ]
    return result


async def old_worker_trials(url: str, base_url: str, count: int, trials: int) -> dict[str, Any]:
    settings = bench_settings(base_url, rate_limit_rpm=RPM)
    handler = TimingGenerator(settings)
    old = OldWorker(url, settings, handler)
    commits: dict[str, float] = {}
    ahead: dict[str, int] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(old.run)
        began = time.time()
        for trial in range(trials):  # spread over one poll period
            await anyio.sleep(max(0.0, began + 5.0 * trial / trials - time.time()))
            store = f"old-{count}-{trial}"
            commits[store] = await insert_store(url, store, B_ITEMS)
            rows = await anyio.to_thread.run_sync(query, url, "pending_ahead", {"store": store})
            ahead[store] = int(rows[0][0])
        last = max(commits.values())
        with anyio.move_on_after(OLD_PHASE_LIMIT):
            while not any(at > last and n for at, n in old.claims):
                await old.claimed.wait()
        ended = time.time()
        tg.cancel_scope.cancel()
    claimed = await claimed_times(url, list(commits))
    await handler.aclose()
    await anyio.to_thread.run_sync(execute, url, "drop_pending", {"stores": list(commits)})
    result = _latencies(commits, claimed, handler.times.first, None, ended)
    throughput = old.completed / max(1e-9, old.last_completion - began)
    result["items_per_second"] = throughput
    result["claims_after_last_insert"] = sum(1 for at, n in old.claims if at > last and n)
    result["ahead"] = summary([float(v) for v in ahead.values()])
    result["estimated_wait"] = summary([v / throughput for v in ahead.values()])
    return result


def _latencies(
    commits: dict[str, float],
    claimed: dict[str, float],
    started: dict[str, float],
    give_up: float | None,
    ended: float | None = None,
) -> dict[str, Any]:
    """Per-trial latencies. A store whose item was not claimed (started) counts with what it
    had waited by then, a lower bound; a percentile above every real value is a lower bound."""
    waited = {s: (ended - c) if ended else (give_up or 0.0) for s, c in commits.items()}
    return {
        "trials": len(commits),
        "claimed": censored_summary(commits, claimed, waited),
        "started": censored_summary(commits, started, waited),
    }


def censored_summary(
    commits: dict[str, float], events: dict[str, float], waited: dict[str, float]
) -> dict[str, Any]:
    seen = [events[s] - c for s, c in commits.items() if s in events]
    bounds = [waited[s] for s in commits if s not in events]
    stats: dict[str, Any] = summary(seen + bounds)
    top = max(seen, default=-1.0)
    for q in ("p50", "p99"):
        stats[f"{q}_lower_bound"] = stats[q] > top
    stats["not_seen"] = len(bounds)
    return stats


async def run_async(quick: bool) -> dict[str, Any]:
    counts = [1, 10, 100, 1000]
    old_counts = [1, 1000] if quick else counts
    trials, timeout = (20, 2.0) if quick else (40, 5.0)
    results: dict[str, Any] = {}
    with scratch_database("start") as url, stub_process(RPM, LATENCY) as stub, progress() as bar:
        task = bar.add_task("start latency", total=len(counts) + len(old_counts))
        load_in_chunks(url, ["store-A"], A_BACKLOG, bar)
        others = 0
        for count in counts:
            bar.update(task, description=f"{count} other store(s): loading")
            new = [f"other-{n:04d}" for n in range(others, count)]
            with psycopg.connect(url, autocommit=True) as conn:
                add_backlog(conn, new, other_backlog(count))
                conn.execute("VACUUM (ANALYZE) job_items")
            others = count
            bar.update(task, description=f"{count} other store(s): project's worker")
            entry = {"new": await new_worker_trials(url, stub.base_url, count, trials, timeout)}
            bar.advance(task)
            if count in old_counts:
                bar.update(task, description=f"{count} other store(s): old worker")
                entry["old"] = await old_worker_trials(url, stub.base_url, count, trials)
                bar.advance(task)
            results[str(count)] = entry
        stub_stats = stub.stats()
    return {
        "quick": quick,
        "rpm": RPM,
        "stub_latency": LATENCY,
        "a_backlog": A_BACKLOG,
        "b_items": B_ITEMS,
        "counts": counts,
        "trial_timeout": timeout,
        "results": results,
        "stub": stub_stats,
        "note": "quick mode: the old worker at 1 and 1,000 other stores only" if quick else "",
    }


def _cell(stats: dict[str, Any], q: str) -> str:
    if stats[f"{q}_lower_bound"]:
        return f"> {stats[q]:.1f} s"
    return f"{stats[q] * 1000:,.0f} ms"


HEADERS = [
    "other stores",
    "worker",
    "claimed p50",
    "claimed p99",
    "started p50",
    "started p99",
    "not started",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for count in result["counts"]:
        entry = result["results"][str(count)]
        for who, stats in entry.items():
            label = "project" if who == "new" else "old (5 s poll, FIFO 100)"
            cells = [_cell(stats[key], q) for key in ("claimed", "started") for q in ("p50", "p99")]
            missing = f"{stats['started']['not_seen']}/{stats['trials']}"
            out.append([f"{count:,}", label, *cells, missing])
            if who == "old":
                wait = stats["estimated_wait"]
                p50, p99 = (f"{wait[q] / 60:,.0f} min" for q in ("p50", "p99"))
                out.append(["", "old, estimated", "", "", p50, p99, ""])
    return out


def report(result: dict[str, Any]) -> str:
    table("Store start latency (B inserts 50 items; A holds 100,000)", HEADERS, rows(result))
    new = [result["results"][str(c)]["new"]["started"] for c in result["counts"]]
    worst = max(new, key=lambda stats: stats["p99"])
    line = f"project's worker: worst p99 to first item started {_cell(worst, 'p99')}"
    line += f"; stub 429s: {result['stub']['rate_limited_total']}"
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(9, 5.2)
    counts = result["counts"]
    for x, count in enumerate(counts):
        entry = result["results"][str(count)]
        for offset, who, color in ((-0.2, "new", "C0"), (0.2, "old", "C3")):
            if who not in entry:
                continue
            stats = entry[who]["started"]
            hatch = "//" if stats["p50_lower_bound"] else None
            ax.bar(x + offset, stats["p50"], 0.4, color=color, hatch=hatch, alpha=0.8)
            face = "none" if stats["p99_lower_bound"] else "k"
            ax.scatter([x + offset], [stats["p99"]], marker="o", facecolors=face, color="k")
            if who == "old":
                wait = entry[who]["estimated_wait"]["p50"]
                ax.scatter([x + offset], [wait], marker="^", color=color, s=60, zorder=3)
                ax.annotate(
                    f"est. {wait / 60:,.0f} min",
                    (x + offset, wait),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=7,
                )
    handles = [
        Patch(color="C0", alpha=0.8, label="project: p50"),
        Patch(color="C3", alpha=0.8, label="old: p50"),
        Patch(facecolor="white", edgecolor="k", hatch="//", label="not started yet: lower bound"),
        Line2D([], [], marker="o", color="k", linestyle="", label="p99 (hollow: lower bound)"),
        Line2D([], [], marker="^", color="C3", linestyle="", label="old: est. wait (ahead / rate)"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    ax.set_yscale("log")
    ax.set_ylim(0.01, 3e5)
    ax.set_xticks(range(len(counts)), [f"{c:,}" for c in counts])
    ax.set_xlabel("other active stores (store A: 100,000 pending)")
    ax.set_ylabel("B's insert commit → first item started (s)")
    ax.set_title("New store start latency at 450 RPM: project vs old worker")
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, anyio.run(run_async, quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
