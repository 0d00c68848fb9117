"""Job kinds under one budget: `python -m bench.kinds [--quick]`.

- fairness: 10 stores, each with a job of each of the three OpenAI kinds (a description, SEO
  metadata as a structured output, a translation), one worker process at its defaults under one
  budget of 24,000 RPM (40 items a store a second: at a few a second, one item more or less is
  already 2 % of Jain's index); Jain's index of the stores' items started in every full second
  while all of them have work (target >= 0.99), and a late store's first item (target: within
  one slot plus the claim: at this budget a process's slot seekers hold the next 50 ms of
  slots, SLOT_HORIZON, so the bound is that, as before kinds);
- limited: two processes sharing that budget, one serving every kind and one serving `seo_meta`
  only, 10 stores of descriptions and 2 of SEO work: the items each claimed by kind, and the
  budget slots each took, against the items it claimed (a slot spent on a store without its
  kind would show as a grant without an item); and a late store's first item, within one slot
  (20 ms) plus the claim.

Real worker processes (`listener worker`), the stub in its own process answering in 50 ms.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import psycopg

from bench.common import (
    console,
    jain,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    query,
    save_figure,
    scratch_database,
    spawn_worker,
    sql,
    status_counts,
    stop_processes,
    stub_process,
    table,
    timed,
    wait_workers_ready,
)

NAME = "kinds"
FAIR_RPM, RPM = 24_000, 3000
KINDS = {
    "product_description": {},
    "seo_meta": {"keywords": "gift"},
    "translation": {"language": "French"},
}
STORES = [f"kinds-{n}" for n in range(10)]
LATE_AFTER = 5.0
WORKER_ENV = {"RATE_LIMIT_RPM": str(RPM), "WORKER_CONCURRENCY": "16", "LOG_LEVEL": "WARNING"}
FAIR_ENV = {"RATE_LIMIT_RPM": str(FAIR_RPM), "LOG_LEVEL": "WARNING"}
# A heartbeat (every 5 s) after the last claim: its limiter's grants are all counted.
HEARTBEAT_WAIT = 6.5


def add(url: str, rows: list[tuple[str, str, int]]) -> float:
    """Jobs of (store, kind, items), in one statement; the time its commit returned."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql("queries")["add_kinds_backlog"],
            {
                "stores": [store for store, _kind, _n in rows],
                "kinds": [kind for _store, kind, _n in rows],
                "options": [json.dumps(KINDS[kind]) for _store, kind, _n in rows],
                "counts": [n for _store, _kind, n in rows],
            },
        )
    return time.time()


def drain(url: str, total: int, deadline: float) -> None:
    while sum(n for s, n in status_counts(url).items() if s in ("COMPLETED", "FAILED")) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backlog did not drain: {status_counts(url)}")
        time.sleep(0.2)


def fairness(quick: bool) -> dict[str, Any]:
    per_job = 150 if quick else 400
    with scratch_database("kinds_fair") as url, stub_process(latency=0.05) as stub:
        procs = [spawn_worker(url, stub.base_url, **FAIR_ENV)]
        try:
            wait_workers_ready(url, procs)
            since = add(url, [(store, kind, per_job) for store in STORES for kind in KINDS])
            time.sleep(LATE_AFTER)
            add(url, [("kinds-late", "seo_meta", 5)])
            total = len(STORES) * len(KINDS) * per_job + 5
            drain(url, total, time.monotonic() + 600)
        finally:
            stop_processes(procs)
        with psycopg.connect(url) as conn:
            rows = conn.execute(sql("queries")["starts_by_second"], {"since": since}).fetchall()
            late = conn.execute(sql("queries")["first_claim"], {"store": "kinds-late"}).fetchone()
            failed = conn.execute(
                "SELECT count(*) FROM job_items WHERE status <> 'COMPLETED'"
            ).fetchone()
    seconds: dict[int, dict[str, int]] = defaultdict(dict)
    for store, second, count in rows:
        seconds[int(second)][str(store)] = int(count)
    # Full seconds while every store of the backlog still had work: from the first whole
    # second to the last second before any of them ran dry (all are the same size).
    last = min(max(s for s, by in seconds.items() if store in by) for store in STORES)
    window = [s for s in sorted(seconds) if 1 <= s < last]
    indexes = [jain([seconds[s].get(store, 0) for store in STORES]) for s in window]
    return {
        "items_per_job": per_job,
        "seconds": len(window),
        "jain_min": min(indexes) if indexes else None,
        "jain_mean": sum(indexes) / len(indexes) if indexes else None,
        "per_second": {str(s): seconds[s] for s in window},
        "late_first_claim_s": late[0] if late else None,
        "slot_s": 60 / FAIR_RPM,
        "not_completed": int(failed[0]) if failed else None,
    }


def limited(quick: bool) -> dict[str, Any]:
    descriptions, seo = (100, 40) if quick else (200, 100)
    with scratch_database("kinds_limited") as url, stub_process(latency=0.05) as stub:
        everything = spawn_worker(url, stub.base_url, **WORKER_ENV)
        seo_only = spawn_worker(url, stub.base_url, WORKER_KINDS="seo_meta", **WORKER_ENV)
        procs = [everything, seo_only]
        try:
            wait_workers_ready(url, procs)
            rows = [(store, "product_description", descriptions) for store in STORES]
            rows += [(f"seo-{n}", "seo_meta", seo) for n in range(2)]
            add(url, rows)
            time.sleep(LATE_AFTER)
            add(url, [("kinds-late", "translation", 5)])
            drain(url, len(STORES) * descriptions + 2 * seo + 5, time.monotonic() + 600)
            time.sleep(HEARTBEAT_WAIT)
            claims = query(url, "claims_by_worker")
            with psycopg.connect(url) as conn:
                late = conn.execute(
                    sql("queries")["first_claim"], {"store": "kinds-late"}
                ).fetchone()
        finally:
            stop_processes(procs)
    names = {everything.pid: "every kind", seo_only.pid: "seo_meta only"}
    by_process: dict[str, dict[str, Any]] = {}
    for pid, kind, count, grants in claims:
        entry = by_process.setdefault(names.get(int(pid), str(pid)), {"items": {}, "grants": 0})
        if kind is not None:
            entry["items"][str(kind)] = int(count)
        entry["grants"] = int(grants or 0)
    for entry in by_process.values():
        entry["claimed"] = sum(entry["items"].values())
        entry["grants_without_item"] = entry["grants"] - entry["claimed"]
    return {
        "descriptions_per_store": descriptions,
        "seo_per_store": seo,
        "processes": by_process,
        "late_first_claim_s": late[0] if late else None,
        "slot_s": 60 / RPM,
    }


def run(quick: bool) -> dict[str, Any]:
    console.print("[bold]kinds[/bold]: fairness across kinds under one budget")
    fair = fairness(quick)
    console.print("[bold]kinds[/bold]: a process limited to one kind beside one serving all")
    return {
        "quick": quick,
        "fair_rpm": FAIR_RPM,
        "rpm": RPM,
        "fairness": fair,
        "limited": limited(quick),
    }


def report(result: dict[str, Any]) -> str:
    fair, lim = result["fairness"], result["limited"]
    lines = [
        f"fairness: 10 stores x 3 kinds x {fair['items_per_job']} items at {result['fair_rpm']:,} "
        "RPM: "
        f"Jain min {fair['jain_min']:.4f}, mean {fair['jain_mean']:.4f} over "
        f"{fair['seconds']} full seconds; late store's first item claimed "
        f"{fair['late_first_claim_s'] * 1000:.1f} ms after its job (one slot: "
        f"{fair['slot_s'] * 1000:.1f} ms); {fair['not_completed']} not completed",
        "",
        f"limited: 10 stores of descriptions, 2 of SEO work, two processes under {result['rpm']:,}"
        f" RPM; a late store's translations: first item claimed "
        f"{lim['late_first_claim_s'] * 1000:.1f} ms after its job (one slot: "
        f"{lim['slot_s'] * 1000:.0f} ms)",
        "",
        markdown_table(
            ["process", "items claimed by kind", "budget grants", "grants without an item"],
            [
                [
                    name,
                    ", ".join(f"{k} {n}" for k, n in sorted(e["items"].items())),
                    e["grants"],
                    e["grants_without_item"],
                ]
                for name, e in sorted(lim["processes"].items())
            ],
        ),
    ]
    console.print(
        table(
            "kinds",
            ["process", "items", "grants", "without item"],
            [
                [n, e["claimed"], e["grants"], e["grants_without_item"]]
                for n, e in sorted(lim["processes"].items())
            ],
        )
    )
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> None:
    fair = result["fairness"]
    fig, ax = new_figure()
    seconds = sorted(int(s) for s in fair["per_second"])
    for store in STORES:
        ax.plot(seconds, [fair["per_second"][str(s)].get(store, 0) for s in seconds], lw=1)
    ax.set_xlabel("second of the run")
    ax.set_ylabel("items started (each line a store, 3 kinds each)")
    ax.set_title(f"10 stores x 3 kinds, one budget: Jain min {fair['jain_min']:.4f}")
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    timed(lambda quick: publish(NAME, run(quick), report, plot), args.quick)


if __name__ == "__main__":
    main()
