"""21. Claims of a store whose higher-priority items wait out a backoff (issue 25, weakness 5):
`python -m bench.backoff_claims [--quick]`.

Three stores in one database, each with 1,000 items at priority 0 due now, and 0, 100,000 and
1,000,000 items at priority 10 waiting out a retry's backoff (an hour; --quick: 0 and 100,000).
A claim takes 20 items (MAX_PER_INSTANCE) of one store, rolled back, PREPAREd on a worker-like
session as in bench.claim_cost. Two claims, interleaved claim by claim over the stores, so
that the machine's load falls on both alike:
- `now`: the claim as it ships: items in backoff are out of idx_job_items_pending;
- `before`: the claim as it was (no `NOT in_backoff`), reading an index of the old definition
  (`status = 'PENDING'` only, built for the run): the store's items in backoff sit before its
  due ones (priority first), and the claim reads past them all.
Figures per store: p50 and p99 time, and the ratio of the p50 to the same claim's at 0 in backoff
(goal: 1.5x at most for `now`); of one claim (EXPLAIN ANALYZE BUFFERS): the shared buffers of the
whole statement (most are the UPDATE's index entries, the same for every store) and of its scan
of the store's range (the index pages it read past), and the index it read.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import matplotlib.pyplot as plt
import psycopg
from psycopg import sql as pgsql

from bench.claim_cost import CLAIM_TYPES, worker_session
from bench.common import (
    console,
    markdown_table,
    parse_args,
    progress,
    publish,
    save_figure,
    scratch_database,
    sql,
    summary,
    table,
    timed,
)
from listener.promoter import PROMOTE_BATCH, PROMOTE_LOCK_KEY
from listener.sqlfiles import queries

NAME = "backoff_claims"
DUE = 1_000
QUOTA = 20
GOAL = 1.5
METHODS = {
    "now": "the claim as it ships (items in backoff out of its index)",
    "before": "the claim before (its index holds the items in backoff)",
}
_PARAM = re.compile(r"%\((\w+)\)s")
_NOT_IN_BACKOFF = "          AND NOT j.in_backoff\n"


def claim_text(method: str) -> str:
    text = queries("items")["claim"]
    if method == "before":
        assert _NOT_IN_BACKOFF in text, "the claim reads idx_job_items_pending"
        text = text.replace(_NOT_IN_BACKOFF, "")
    return text


class Prepared:
    """One claim text PREPAREd in SQL (a generic plan, as the worker's session caches it)."""

    def __init__(self, conn: psycopg.Connection[Any], name: str, text: str) -> None:
        self.name = name
        self.names = list(dict.fromkeys(_PARAM.findall(text)))
        body = _PARAM.sub(lambda m: f"${self.names.index(m.group(1)) + 1}", text)
        types = ", ".join(CLAIM_TYPES[n] for n in self.names)
        conn.execute(f"PREPARE {name} ({types}) AS {body}")

    def execute(self, store: str) -> pgsql.Composed:
        values = {
            "stores": [store],
            "limits": [QUOTA],
            "worker_id": "bench-backoff",
            "lease_seconds": 60,
            "max_payload_bytes": 65_536,
            "announce": False,
            "kinds": ["product_description"],
            "lane": "openai",
        }
        return pgsql.SQL("EXECUTE {} ({})").format(
            pgsql.Identifier(self.name),
            pgsql.SQL(", ").join(pgsql.Literal(values[n]) for n in self.names),
        )


PENDING_INDEXES = {"idx_job_items_pending", "bench_pending_before"}


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


def _buffers(node: dict[str, Any]) -> int:
    return int(node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0))


def explain(conn: psycopg.Connection[Any], statement: pgsql.Composed) -> dict[str, Any]:
    """One claim's shared buffers (the whole statement, and the scan of the store's range
    that picks its items) and the indexes its plan reads; rolled back."""
    with conn.transaction(force_rollback=True):
        row = conn.execute(
            pgsql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement
        ).fetchone()
    assert row is not None, "EXPLAIN returns its plan"
    plan = (json.loads(row[0]) if isinstance(row[0], str) else row[0])[0]["Plan"]
    scans = [node for node in _nodes(plan) if node.get("Index Name") in PENDING_INDEXES]
    return {
        "buffers": _buffers(plan),
        "scan_buffers": sum(_buffers(node) for node in scans),
        "indexes": sorted(
            {str(node["Index Name"]) for node in _nodes(plan) if "Index Name" in node}
        ),
    }


def run(quick: bool) -> dict[str, Any]:
    levels = [0, 100_000] if quick else [0, 100_000, 1_000_000]
    samples, seconds = (60, 20.0) if quick else (200, 90.0)
    stores = {level: f"backoff-{level}" for level in levels}
    results: dict[str, dict[str, Any]] = {}
    with scratch_database("backoff_claims") as url, progress() as bar:
        task = bar.add_task("loading", total=len(levels) + 1)
        with psycopg.connect(url, autocommit=True) as conn:
            for level, store in stores.items():
                bar.update(task, description=f"loading {store}")
                conn.execute(
                    sql("queries")["backoff_store"], {"store": store, "backoff": level, "due": DUE}
                )
                bar.advance(task)
            bar.update(task, description="the old index, VACUUM ANALYZE")
            conn.execute(sql("queries")["pending_index_before"])
            conn.execute("VACUUM (ANALYZE) job_items")
            bar.advance(task)
        with psycopg.connect(worker_session(url), autocommit=True) as conn:
            conn.prepare_threshold = None  # psycopg's DEALLOCATE ALL would drop ours
            prepared = {m: Prepared(conn, f"bench_{m}", claim_text(m)) for m in METHODS}
            timings: dict[tuple[str, int], list[float]] = {
                (m, level): [] for m in METHODS for level in levels
            }
            claimed: dict[tuple[str, int], int] = {key: 0 for key in timings}
            measure = bar.add_task("interleaved claims", total=samples)
            deadline = time.monotonic() + seconds
            for turn in range(samples + 2):  # two warm-up rounds
                for level, store in stores.items():
                    for method, claim in prepared.items():
                        with conn.transaction(force_rollback=True):
                            started = time.perf_counter()
                            rows = conn.execute(claim.execute(store)).fetchall()
                            elapsed = time.perf_counter() - started
                        if turn >= 2:
                            timings[method, level].append(elapsed)
                            claimed[method, level] = len(rows)
                bar.advance(measure)
                if turn >= 7 and time.monotonic() > deadline:
                    break
            for method, claim in prepared.items():
                results[method] = {}
                for level, store in stores.items():
                    results[method][str(level)] = {
                        **summary(timings[method, level]),
                        **explain(conn, claim.execute(store)),
                        "items_per_claim": claimed[method, level],
                    }
        promotion = promote_pass(url, samples=20 if quick else 50)
    return {
        "quick": quick,
        "promote": promotion,
        "due_per_store": DUE,
        "quota": QUOTA,
        "levels": levels,
        "methods": METHODS,
        "results": results,
        "note": "quick mode: 0 and 100,000 in backoff; the full run adds 1,000,000"
        if quick
        else "",
    }


def promote_pass(url: str, samples: int) -> dict[str, Any]:
    """The promote step over every item in backoff of the run: passes with nothing due (the
    probe each process makes at each due time), then passes that each promote a batch of fresh
    items whose backoff has just ended (PROMOTE_BATCH of them, inserted before each pass).
    Committed, not rolled back: a rolled-back UPDATE of the same rows again and again piles up
    dead versions no real pass meets."""
    text = queries("backoff")["promote_due"]
    params = {"key": PROMOTE_LOCK_KEY, "batch": PROMOTE_BATCH}
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM job_items WHERE status = 'PENDING' AND in_backoff"
        ).fetchone()
        out["in_backoff"] = int(waiting[0]) if waiting else 0
        for case in ("nothing_due", "batch_due"):
            timings, promoted = [], 0
            for sample in range(samples):
                if case == "batch_due":
                    conn.execute(
                        sql("queries")["backoff_due"],
                        {"store": f"due-{sample}", "due": PROMOTE_BATCH},
                    )
                started = time.perf_counter()
                row = conn.execute(text, params).fetchone()
                timings.append(time.perf_counter() - started)
                promoted = int(row[1]) if row else 0
            out[case] = {**summary(timings), "promoted": promoted}
    return out


def ratio(result: dict[str, Any], method: str, level: int) -> float:
    at = result["results"][method]
    return float(at[str(level)]["p50"] / at["0"]["p50"])


HEADERS = [
    "claim",
    "in backoff",
    "p50 ms",
    "p99 ms",
    "p50 vs 0",
    "buffers",
    "scan buffers",
    "pending index",
    "items",
    "n",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for method in result["methods"]:
        for level in result["levels"]:
            stats = result["results"][method][str(level)]
            out.append(
                [
                    method,
                    f"{level:,}",
                    f"{stats['p50'] * 1000:.2f}",
                    f"{stats['p99'] * 1000:.2f}",
                    f"{ratio(result, method, level):.2f}x",
                    f"{stats['buffers']:,}",
                    f"{stats['scan_buffers']:,}",
                    ", ".join(sorted(set(stats["indexes"]) & PENDING_INDEXES)),
                    str(stats["items_per_claim"]),
                    str(stats["n"]),
                ]
            )
    return out


def verdict(result: dict[str, Any]) -> str:
    levels = [level for level in result["levels"] if level]
    worst = max(ratio(result, "now", level) for level in levels)
    shown = ", ".join(f"{ratio(result, 'now', level):.2f}x at {level:,}" for level in levels)
    return (
        f"the claim with higher-priority items in backoff, against none: {shown} "
        f"(goal {GOAL}x at most: {'met' if worst <= GOAL else 'NOT met'})"
    )


def promote_line(result: dict[str, Any]) -> str:
    promote = result["promote"]
    idle, batch = promote["nothing_due"], promote["batch_due"]
    return (
        f"the promote step with {promote['in_backoff']:,} items in backoff: "
        f"{idle['p50'] * 1000:.2f} ms p50 with nothing due, {batch['p50'] * 1000:.2f} ms p50 "
        f"promoting {batch['promoted']:,} (p99 {idle['p99'] * 1000:.2f} / "
        f"{batch['p99'] * 1000:.2f} ms)"
    )


def report(result: dict[str, Any]) -> str:
    title = f"Claims of {QUOTA} items of a store with items in backoff ({DUE:,} due)"
    table(title, HEADERS, rows(result))
    lines = [verdict(result), promote_line(result)]
    for line in lines:
        console.print(line)
    return markdown_table(HEADERS, rows(result)) + "\n\n" + "\n\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.5), dpi=110)
    levels = result["levels"]
    positions = range(len(levels))
    for method, label in result["methods"].items():
        at = result["results"][method]
        left.plot(positions, [at[str(v)]["p50"] * 1000 for v in levels], marker="o", label=label)
        scans = [max(1, at[str(v)]["scan_buffers"]) for v in levels]
        right.plot(positions, scans, marker="o", label=label)
    for ax, ylabel in (
        (left, "p50 per claim (ms)"),
        (right, "buffers of its scan of the store's range"),
    ):
        ax.set_yscale("log")
        ax.set_xticks(list(positions), [f"{v:,}" for v in levels])
        ax.set_xlabel("higher-priority items in backoff")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"Claims of {QUOTA} items of one store, {DUE:,} due at a lower priority")
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
