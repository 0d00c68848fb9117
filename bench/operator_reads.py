"""6. What the operator's reads cost at a big backlog: the stats' item counts (`/metrics`,
`/api/rate-limiter/stats`) before and after issue 11's defect 6, and `listener doctor`, at
1,000,000 PENDING items over 10,000 stores (quick: 100,000 over 1,000).

The counts are timed as the HTTP handlers run them (the old exact counts; the new bounded
counts with the planner's estimate above 10,000), after VACUUM ANALYZE. The doctor is timed
whole (`run_checks`), with and without the schema comparison against sql/schema.sql.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

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
from listener.doctor import run_checks
from listener.http.fleet import fetch_fleet
from listener.settings import load_settings

NAME = "operator_reads"
SAMPLES = 20


def time_old_counts(url: str, samples: int) -> list[float]:
    timings = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(samples + 2):
            started = time.perf_counter()
            conn.execute(sql("baselines")["item_counts_exact"]).fetchall()
            timings.append(time.perf_counter() - started)
    return timings[2:]


async def _time_new_counts(url: str, samples: int) -> tuple[list[float], dict[str, Any]]:
    settings = load_settings(database_url=url)
    timings = []
    async with AsyncConnectionPool(
        url, min_size=1, max_size=1, kwargs={"autocommit": True}
    ) as pool:
        for _ in range(samples + 2):
            started = time.perf_counter()
            fleet = await fetch_fleet(pool, settings)
            timings.append(time.perf_counter() - started)
    figures = {"pending": fleet.pending, "ready": fleet.ready, "estimated": fleet.estimated}
    return timings[2:], figures


def time_doctor(url: str, schema_diff: bool, runs: int = 3) -> tuple[list[float], list[str]]:
    settings = load_settings(database_url=url)
    timings, statuses = [], []
    for _ in range(runs):
        started = time.perf_counter()
        checks = run_checks(url, settings, schema_diff=schema_diff)
        timings.append(time.perf_counter() - started)
        statuses = [f"{c.name}:{c.status.value}" for c in checks]
    return timings, statuses


def run(quick: bool) -> dict[str, Any]:
    stores, per_store = (1_000, 100) if quick else (10_000, 100)
    names = [f"store-{n:05d}" for n in range(stores)]
    with scratch_database("operator") as url, progress() as bar:
        load_in_chunks(url, names, per_store, bar)
        old = time_old_counts(url, SAMPLES)
        new, figures = anyio.run(_time_new_counts, url, SAMPLES)
        doctor_fast, statuses = time_doctor(url, schema_diff=False)
        doctor_full, _ = time_doctor(url, schema_diff=True)
    return {
        "quick": quick,
        "pending": stores * per_store,
        "stores": stores,
        "old_counts": summary(old),
        "new_counts": summary(new),
        "new_figures": figures,
        "doctor_without_schema_diff": summary(doctor_fast),
        "doctor": summary(doctor_full),
        "doctor_checks": statuses,
    }


def rows(result: dict[str, Any]) -> list[list[str]]:
    def ms(stats: dict[str, float]) -> str:
        return f"{stats['p50'] * 1000:,.1f} ms"

    return [
        ["stats counts, before (exact)", ms(result["old_counts"])],
        ["stats counts, after (bounded + estimate)", ms(result["new_counts"])],
        ["listener doctor --no-schema-diff", ms(result["doctor_without_schema_diff"])],
        ["listener doctor (with the schema comparison)", ms(result["doctor"])],
    ]


def report(result: dict[str, Any]) -> str:
    title = f"{result['pending']:,} PENDING over {result['stores']:,} stores (p50)"
    return f"**{title}**\n\n" + markdown_table(["read", "time"], rows(result))


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(8, 3.5)
    labels = [row[0] for row in rows(result)]
    keys = ["old_counts", "new_counts", "doctor_without_schema_diff", "doctor"]
    ax.barh(labels, [result[key]["p50"] * 1000 for key in keys])
    ax.set_xscale("log")
    ax.set_xlabel("ms (p50, log scale)")
    ax.set_title(f"{result['pending']:,} pending over {result['stores']:,} stores")
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    result = publish(NAME, timed(run, args.quick), report, plot)
    console.print(table("operator reads", ["read", "time"], rows(result)))
    console.print(", ".join(result["doctor_checks"]))


if __name__ == "__main__":
    main()
