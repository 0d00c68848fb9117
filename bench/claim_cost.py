"""1. Claim cost against the backlog: the project's claim against the old FIFO claim and a naive
fair claim, at 10,000 / 100,000 / 1,000,000 PENDING items over 1,000 stores.

Every claim runs in a transaction that is rolled back after timing, so the backlog keeps its
size, and takes 100 items. The project's claim runs as the worker runs it: prepared once, with
the generic plan of a worker's session. psycopg forgets what it prepared at every ROLLBACK (and
would plan each rolled-back claim afresh), so the bench prepares it in SQL (`PREPARE`) and
sends `EXECUTE`. The project's claim is measured in two shapes, the stores rotating
through all 1,000: 100 stores x 1 item (what the dispatcher sends when 100 workers wait and
1,000 stores are ready) and 10 stores x 10 items (deeper reads per store; MAX_PER_INSTANCE=20
would need more than the 10 items per store of the 10,000 level).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import psycopg
from matplotlib.ticker import ScalarFormatter
from psycopg import sql as pgsql

from bench.common import (
    console,
    load_in_chunks,
    markdown_table,
    new_figure,
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
from listener.db import with_session_options
from listener.settings import load_settings
from listener.sqlfiles import queries

NAME = "claim_cost"
STORES = [f"store-{n:04d}" for n in range(1000)]
BATCH = 100
PER_STORE = 20  # the naive fair claim's cap per store: MAX_PER_INSTANCE's default
# The project's claim: (stores per claim, items per store)
SHAPES = {"listener_100x1": (100, 1), "listener_10x10": (10, 10)}
METHODS = {
    "listener_100x1": "project: 100 stores x 1 (LATERAL per store)",
    "listener_10x10": "project: 10 stores x 10 (LATERAL per store)",
    "fifo": "old: ORDER BY id LIMIT 100",
    "naive_fair": "naive fair: row_number() over all PENDING",
}
OWN = "listener_100x1"
WARMUP = 3


def statement(method: str) -> str:
    return queries("items")["claim"] if method in SHAPES else sql("baselines")[method]


def params(method: str, turn: int) -> dict[str, Any]:
    common = {
        "worker_id": "bench-claim",
        "lease_seconds": 60,
        "max_payload_bytes": 65_536,
        "announce": False,
        "kinds": ["product_description"],
        "lane": "openai",
    }
    if method not in SHAPES:
        return {**common, "batch": BATCH, "per_store": PER_STORE}
    count, per_store = SHAPES[method]
    stores = [STORES[(turn * count + k) % len(STORES)] for k in range(count)]
    return {**common, "stores": stores, "limits": [per_store] * count}


# The claim's parameters as psycopg sends them from the worker.
CLAIM_TYPES = {
    "stores": "text[]",
    "limits": "int[]",
    "worker_id": "text",
    "lease_seconds": "float8",
    "max_payload_bytes": "int",
    "announce": "bool",
    "kinds": "text[]",
    "lane": "text",
}
_PARAM = re.compile(r"%\((\w+)\)s")


class PreparedClaim:
    """The project's claim PREPAREd in SQL on a worker-like session: planned once, generically
    (the session's plan_cache_mode), as the worker's psycopg runs it from its sixth run on."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        text = queries("items")["claim"]
        self.names = list(dict.fromkeys(_PARAM.findall(text)))
        body = _PARAM.sub(lambda m: f"${self.names.index(m.group(1)) + 1}", text)
        types = ", ".join(CLAIM_TYPES[name] for name in self.names)
        # Nothing of psycopg's own: its DEALLOCATE ALL after a ROLLBACK would drop this one.
        conn.prepare_threshold = None
        conn.execute(f"PREPARE bench_claim ({types}) AS {body}")

    def execute(self, values: dict[str, Any]) -> pgsql.Composed:
        return pgsql.SQL("EXECUTE bench_claim ({})").format(
            pgsql.SQL(", ").join(pgsql.Literal(values[name]) for name in self.names)
        )


def worker_session(url: str) -> str:
    return with_session_options(url, load_settings(database_url=url, openai_api_key="bench"))


def measure(
    conn: psycopg.Connection[Any], method: str, samples: int, seconds: float
) -> dict[str, Any]:
    """Time `samples` claims (fewer if `seconds` run out first, at least 5), each rolled back."""
    text = statement(method)
    prepared = PreparedClaim(conn) if method in SHAPES else None
    timings: list[float] = []
    items = 0
    deadline = time.monotonic() + seconds
    for turn in range(WARMUP + samples):
        with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            if prepared is None:
                rows = conn.execute(text, params(method, turn)).fetchall()
            else:
                rows = conn.execute(prepared.execute(params(method, turn))).fetchall()
            elapsed = time.perf_counter() - started
        if turn >= WARMUP:
            timings.append(elapsed)
            items += len(rows)
            if time.monotonic() > deadline and len(timings) >= 5:
                break
    with conn.transaction(force_rollback=True):
        explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
        if prepared is None:
            row = conn.execute(explain + text, params(method, 0)).fetchone()
        else:
            row = conn.execute(pgsql.SQL(explain) + prepared.execute(params(method, 0))).fetchone()
    assert row is not None, "EXPLAIN returns its plan"
    buffers = _buffers(json.loads(row[0]) if isinstance(row[0], str) else row[0])
    stats = summary(timings)
    return {
        **stats,
        "items_per_claim": items / len(timings),
        "items_per_second": items / sum(timings),
        "buffers": buffers,
    }


def _buffers(plan: list[dict[str, Any]]) -> int:
    top = plan[0]["Plan"]
    return int(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0))


def run(quick: bool) -> dict[str, Any]:
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    samples, seconds = (100, 6.0) if quick else (300, 20.0)
    results: dict[str, dict[str, Any]] = {}
    with scratch_database("claim") as url, progress() as bar:
        loaded = 0
        task = bar.add_task("claim cost", total=len(sizes) * len(METHODS))
        for size in sizes:
            bar.update(task, description=f"loading {size:,} items")
            load_in_chunks(url, STORES, (size - loaded) // len(STORES), bar)
            loaded = size
            results[str(size)] = {}
            for method in METHODS:
                bar.update(task, description=f"{method} at {size:,}")
                # The project's claim in a session like the worker's (its timeouts, generic
                # plans for prepared statements); the others in a plain session.
                conninfo = worker_session(url) if method in SHAPES else url
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    results[str(size)][method] = measure(conn, method, samples, seconds)
                    conn.execute("VACUUM job_items")  # each method starts from the same state
                bar.advance(task)
    return {
        "quick": quick,
        "stores": len(STORES),
        "items_per_claim": BATCH,
        "shapes": SHAPES,
        "methods": METHODS,
        "sizes": sizes,
        "results": results,
        "note": "" if not quick else "quick mode: 10k and 100k only; the full run adds 1M",
    }


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for size in result["sizes"]:
        at = result["results"][str(size)]
        own = at[OWN]["p50"]
        for method, stats in at.items():
            out.append(
                [
                    f"{size:,}",
                    method,
                    f"{stats['p50'] * 1000:.2f}",
                    f"{stats['p99'] * 1000:.2f}",
                    f"{stats['items_per_second']:,.0f}",
                    f"{stats['buffers']:,}",
                    "1" if method == OWN else f"{stats['p50'] / own:,.1f}x",
                    str(stats["n"]),
                ]
            )
    return out


HEADERS = ["pending", "claim", "p50 ms", "p99 ms", "items/s", "buffers", "p50 vs 100x1", "n"]


def flatness(result: dict[str, Any]) -> float:
    """The project's median claim at the largest backlog over the smallest."""
    sizes = result["sizes"]
    at = result["results"]
    return float(at[str(sizes[-1])][OWN]["p50"] / at[str(sizes[0])][OWN]["p50"])


def report(result: dict[str, Any]) -> str:
    table("Claim cost against the backlog (100 items per claim)", HEADERS, rows(result))
    growth = flatness(result)
    sizes = result["sizes"]
    line = (
        f"project's claim p50 at {sizes[-1]:,} / at {sizes[0]:,} pending: {growth:.2f}x "
        f"(the backlog grew {sizes[-1] // sizes[0]:,}x)"
    )
    console.print(line)
    return markdown_table(HEADERS, rows(result)) + f"\n\n{line}\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    sizes = result["sizes"]
    for method, label in result["methods"].items():
        p50 = [result["results"][str(s)][method]["p50"] * 1000 for s in sizes]
        p99 = [result["results"][str(s)][method]["p99"] * 1000 for s in sizes]
        (line,) = ax.plot(sizes, p50, marker="o", label=f"{label} (p50)")
        ax.plot(sizes, p99, marker="x", linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("PENDING items (1,000 stores)")
    ax.set_ylabel("time per claim of 100 items (ms); dashed: p99")
    ax.set_title("Claim cost against the backlog")
    ax.legend(fontsize=8)
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
