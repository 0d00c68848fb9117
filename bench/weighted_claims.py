"""17. Weights when a claim holds several items (issue 25, weakness 7):
`python -m bench.weighted_claims [--quick]`.

No budget (`RATE_LIMIT_RPM=0`): one worker process with an instant handler (`bench.workers`),
every store backlogged far past the run, weights 4:1 and 8:1:1. Three claim shapes, set by the
worker's settings: 1-item claims (`WORKER_CONCURRENCY=2`: two claims of one item in flight),
several items per claim (`WORKER_CONCURRENCY=16`: claims of up to 8, `MAX_PER_INSTANCE=20`), and
quotas capped by `MAX_PER_INSTANCE=3` (claims of up to 16). Each store's share of the items
claimed in the measured window (after a 2 s warm-up), against weight / sum of weights; target
within +-3 points in every shape.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.common import (
    INSTANT_WORKER,
    add_backlog,
    console,
    markdown_table,
    new_figure,
    parse_args,
    progress,
    publish,
    save_figure,
    scratch_database,
    spawn_worker,
    sql,
    stop_processes,
    stub_process,
    table,
    timed,
    wait_workers_ready,
)

NAME = "weighted_claims"
WEIGHTS = {"4:1": {"heavy": 4, "light": 1}, "8:1:1": {"heavy": 8, "light-a": 1, "light-b": 1}}
SHAPES = {
    "1-item claims": {"WORKER_CONCURRENCY": "2", "MAX_PER_INSTANCE": "20"},
    "up to 8 items a claim": {"WORKER_CONCURRENCY": "16", "MAX_PER_INSTANCE": "20"},
    "capped at MAX_PER_INSTANCE=3": {"WORKER_CONCURRENCY": "32", "MAX_PER_INSTANCE": "3"},
}
WARMUP = 2.0
TOLERANCE = 3.0  # percentage points

COUNT_CLAIMED = """
SELECT instance_id, count(*) FROM job_items
WHERE claimed_at >= to_timestamp(%(since)s) AND claimed_at < to_timestamp(%(until)s)
GROUP BY instance_id
"""
PENDING = "SELECT instance_id, count(*) FROM job_items WHERE status = 'PENDING' GROUP BY 1"


def one_run(weights: dict[str, int], env: dict[str, str], seconds: float, backlog: int) -> Any:
    with scratch_database("weighted_claims") as url, stub_process() as stub:
        with psycopg.connect(url, autocommit=True) as conn:
            for store, weight in weights.items():
                conn.execute(
                    sql("queries")["set_policy"],
                    {
                        "store": store,
                        "weight": weight,
                        "rpm_limit": None,
                        "max_in_flight": None,
                        "paused": False,
                    },
                )
            for store in weights:
                for _ in range(backlog // 50_000):
                    add_backlog(conn, [store], 50_000)
            conn.execute("VACUUM (ANALYZE) job_items")
        proc = spawn_worker(url, stub.base_url, INSTANT_WORKER, RATE_LIMIT_RPM="0", **env)
        try:
            wait_workers_ready(url, [proc])
            time.sleep(WARMUP)
            since = time.time()
            time.sleep(seconds)
            until = time.time()
        finally:
            stop_processes([proc])
        with psycopg.connect(url, autocommit=True) as conn:
            window = {"since": since, "until": until}
            claimed = {str(s): int(n) for s, n in conn.execute(COUNT_CLAIMED, window)}
            pending = {str(s): int(n) for s, n in conn.execute(PENDING)}
    total = sum(claimed.values())
    weight_sum = sum(weights.values())
    shares: list[dict[str, Any]] = [
        {
            "store": store,
            "weight": weight,
            "items": claimed.get(store, 0),
            "share": 100 * claimed.get(store, 0) / total if total else 0.0,
            "expected": 100 * weight / weight_sum,
            "still_pending": pending.get(store, 0),
        }
        for store, weight in weights.items()
    ]
    return {
        "seconds": until - since,
        "items": total,
        "items_per_second": total / (until - since),
        "every_store_backlogged": all(s["still_pending"] > 0 for s in shares),
        "max_deviation": max(abs(s["share"] - s["expected"]) for s in shares),
        "shares": shares,
    }


def run(quick: bool) -> dict[str, Any]:
    seconds = 5.0 if quick else 15.0
    backlog = 100_000 if quick else 200_000
    runs = []
    with progress() as bar:
        task = bar.add_task("weighted claims", total=len(WEIGHTS) * len(SHAPES))
        for label, weights in WEIGHTS.items():
            for shape, env in SHAPES.items():
                bar.update(task, description=f"{label}, {shape}")
                runs.append(
                    {"weights": label, "shape": shape, **one_run(weights, env, seconds, backlog)}
                )
                bar.advance(task)
    return {
        "quick": quick,
        "tolerance_points": TOLERANCE,
        "runs": runs,
        "within_tolerance": all(r["max_deviation"] <= TOLERANCE for r in runs),
        "note": "quick mode: 5 s windows over 100,000 items a store" if quick else "",
    }


HEADERS = ["weights", "claims", "items/s", "shares (expected)", "max deviation", "backlogged"]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r["weights"],
            r["shape"],
            f"{r['items_per_second']:,.0f}",
            " / ".join(f"{s['share']:.1f} ({s['expected']:.0f})" for s in r["shares"]),
            f"{r['max_deviation']:.1f} pt",
            "yes" if r["every_store_backlogged"] else "NO",
        ]
        for r in result["runs"]
    ]


def report(result: dict[str, Any]) -> str:
    table("Shares of the items, no budget (target: within +-3 points)", HEADERS, rows(result))
    line = f"every shape within +-{TOLERANCE:.0f} points: {result['within_tolerance']}"
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    for r in result["runs"]:
        ax.scatter(
            [s["expected"] for s in r["shares"]],
            [s["share"] for s in r["shares"]],
            label=f"{r['weights']}, {r['shape']}",
        )
    ax.plot([0, 100], [0, 100], linestyle="--", color="k", linewidth=1)
    ax.set_xlabel("weight / sum of weights (%)")
    ax.set_ylabel("share of the items claimed (%)")
    ax.set_title("Weights with several items per claim, no budget")
    ax.legend(fontsize=8)
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
