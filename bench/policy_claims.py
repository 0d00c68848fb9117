"""The store policy's claim cost, on the database alone: items in backoff (issue 11, defect 5)
and priorities in use, against the same claim without them. Part of `bench.store_policy`.

Each claim takes 1 item from each of 100 stores (what the dispatcher sends when 100 workers wait)
inside a transaction rolled back after timing, the stores rotating, like `bench.claim_cost`.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.common import load_in_chunks, percentile, scratch_database, sql
from listener.sqlfiles import queries

STORES_PER_CLAIM = 100
WARMUP = 3


def _claim_p50(conn: psycopg.Connection[Any], stores: list[str], samples: int) -> dict[str, Any]:
    text = queries("items")["claim"]
    timings: list[float] = []
    for turn in range(WARMUP + samples):
        chosen = [stores[(turn * STORES_PER_CLAIM + k) % len(stores)] for k in range(100)]
        params = {
            "stores": chosen,
            "limits": [1] * len(chosen),
            "worker_id": "bench-policy",
            "lease_seconds": 60,
            "max_payload_bytes": 65_536,
            "announce": False,
            "kinds": ["product_description"],
            "lane": "openai",
        }
        with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            rows = conn.execute(text, params).fetchall()
            elapsed = time.perf_counter() - started
        assert len(rows) == len(chosen), "every store has a due item"
        if turn >= WARMUP:
            timings.append(elapsed)
    # Buffers touched: what the claim reads, whatever the machine's load does to the timings.
    with conn.transaction(force_rollback=True):
        row = conn.execute(b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + text.encode(), params)
        plan = row.fetchone()[0][0]["Plan"]  # type: ignore[index]
    return {
        "p50_ms": 1000 * percentile(timings, 50),
        "p99_ms": 1000 * percentile(timings, 99),
        "buffers": int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]),
    }


def backoff(quick: bool, bar: Any) -> dict[str, Any]:
    """200 stores x 1,000 items; in 100 of them the oldest half waits out a backoff."""
    per_store = 500 if quick else 1000
    stores = [f"store-{n:03d}" for n in range(200)]
    half, none = stores[:100], stores[100:]
    samples = 100 if quick else 300
    with scratch_database("policy_backoff") as url:
        load_in_chunks(url, stores, per_store, bar, analyze=False)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql("queries")["backoff_half"], {"stores": half})
            conn.execute("VACUUM (ANALYZE) job_items")
            with_backoff = _claim_p50(conn, half, samples)
            without = _claim_p50(conn, none, samples)
    return {
        "per_store": per_store,
        "half_in_backoff": with_backoff,
        "none_in_backoff": without,
        "ratio": with_backoff["p50_ms"] / without["p50_ms"],
    }


def priorities(quick: bool, bar: Any) -> dict[str, Any]:
    """1,000 stores, priorities 10 / 0 / -5 in use; the backlog grown 100-fold."""
    stores = [f"store-{n:04d}" for n in range(1000)]
    levels = [10, 100] if quick else [10, 1000]  # items per store: 10,000 and 100,000 or 1 M
    samples = 100 if quick else 300
    results = []
    with scratch_database("policy_priorities") as url:
        loaded = 0
        for per_store in levels:
            with psycopg.connect(url, autocommit=True) as conn:
                task = bar.add_task(f"loading {per_store * len(stores):,}", total=len(stores))
                chunk = max(1, 50_000 // (per_store - loaded))
                for start in range(0, len(stores), chunk):
                    part = stores[start : start + chunk]
                    conn.execute(
                        sql("queries")["add_backlog_priorities"],
                        {"stores": part, "counts": [per_store - loaded] * len(part)},
                    )
                    bar.advance(task, len(part))
                bar.remove_task(task)
                conn.execute("VACUUM (ANALYZE) job_items")
                loaded = per_store
                results.append(
                    {"pending": per_store * len(stores), **_claim_p50(conn, stores, samples)}
                )
    return {"levels": results, "ratio": results[-1]["p50_ms"] / results[0]["p50_ms"]}
