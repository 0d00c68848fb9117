"""What recording and reporting each store's cost costs (issue 27, part 4).

1. The writes, with the usage trigger (`job_items_record_usage`, a row trigger filtered by its
   WHEN clause) on and off, interleaved round by round in one run, so the ratio is measured
   under the same load: `finish_items` completing batches of 100 metered items (the trigger
   adds a ledger row each), and a claim-like UPDATE of 20 PENDING items to PROCESSING (the
   trigger's WHEN clause leaves them out).
2. The reads: one store's month (`store show`, a page's row) and the whole fleet's month
   (`/metrics`, the dashboard's Cost section) at 10,000 stores x 31 days x 2 tiers in the daily
   rollup plus a ledger of 20,000 rows not folded yet (quick: 1,000 stores); the fleet's month
   read from the monthly rollup (sql/usage.sql) and, interleaved, from every daily row of the
   month (the first cut, bench/usage_costs.sql).

`python -m bench.usage_costs [--quick]`; prints the figures and writes
bench/results/usage_costs.json (a full run only).
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from bench.common import (
    console,
    parse_args,
    scratch_database,
    sql,
    summary,
    table,
    write_json,
)
from listener.sqlfiles import queries

NAME = "usage_costs"
BATCH = 100
USAGE = json.dumps({"prompt_tokens": 120, "completion_tokens": 80, "cached_tokens": 0})


def _processing_items(conn: psycopg.Connection[Any], stores: int, per_store: int) -> list[int]:
    conn.execute(
        "INSERT INTO jobs (instance_id) SELECT 'store-' || s FROM generate_series(1, %s) s",
        (stores,),
    )
    rows = conn.execute(
        "INSERT INTO job_items (job_id, instance_id, product_id, status, claimed_by, attempts)"
        " SELECT j.id, j.instance_id, 'p' || n, 'PROCESSING', 'bench', 1"
        " FROM jobs j CROSS JOIN generate_series(1, %s) n RETURNING id",
        (per_store,),
    ).fetchall()
    conn.execute("VACUUM (ANALYZE) job_items")
    return sorted(int(r[0]) for r in rows)


def _finish(conn: psycopg.Connection[Any], ids: list[int]) -> float:
    n = len(ids)
    params = {
        "ids": ids,
        "statuses": ["COMPLETED"] * n,
        "results": ['{"text": "x"}'] * n,
        "errors": [None] * n,
        "delays": [0.0] * n,
        "refunds": [False] * n,
        "attempts": [1] * n,
        "usages": [USAGE] * n,
        "models": ["gpt-4o-mini"] * n,
        "served_tiers": ["realtime"] * n,
        "deferrals": [False] * n,
        "worker_id": "bench",
    }
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(queries("items")["finish_items"], params).fetchall()
    return time.perf_counter() - started


def writes(url: str, rounds: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        ids = _processing_items(conn, 100, rounds * 2 * BATCH // 100)
        timings: dict[str, list[float]] = {"trigger on": [], "trigger off": []}
        for r in range(rounds):
            for mode in (
                ("trigger on", "trigger off") if r % 2 == 0 else ("trigger off", "trigger on")
            ):
                switch = "ENABLE" if mode == "trigger on" else "DISABLE"
                conn.execute(f"ALTER TABLE job_items {switch} TRIGGER job_items_record_usage")
                batch, ids = ids[:BATCH], ids[BATCH:]
                timings[mode].append(_finish(conn, batch))
        conn.execute("ALTER TABLE job_items ENABLE TRIGGER job_items_record_usage")
        claims = _claims(conn, rounds * 5)
    on, off = summary(timings["trigger on"]), summary(timings["trigger off"])
    return {
        "trigger_on": on,
        "trigger_off": off,
        "ratio_p50": on["p50"] / off["p50"],
        "claim_trigger_on": claims["trigger on"],
        "claim_trigger_off": claims["trigger off"],
        "claim_ratio_p50": claims["trigger on"]["p50"] / claims["trigger off"]["p50"],
    }


def _claims(conn: psycopg.Connection[Any], rounds: int) -> dict[str, dict[str, float]]:
    ids = [
        int(r[0])
        for r in conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id)"
            " SELECT j.id, j.instance_id, 'c' || n FROM jobs j"
            " CROSS JOIN generate_series(1, %s) n RETURNING id",
            (rounds * 2 * 20 // 100 + 1,),
        ).fetchall()
    ]
    conn.execute("VACUUM (ANALYZE) job_items")
    timings: dict[str, list[float]] = {"trigger on": [], "trigger off": []}
    order = ("trigger on", "trigger off")
    for r in range(rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            switch = "ENABLE" if mode == "trigger on" else "DISABLE"
            conn.execute(f"ALTER TABLE job_items {switch} TRIGGER job_items_record_usage")
            batch, ids = ids[:20], ids[20:]
            started = time.perf_counter()
            conn.execute(
                "UPDATE job_items SET status = 'PROCESSING', claimed_at = now(),"
                " claimed_by = 'bench', attempts = attempts + 1 WHERE id = ANY(%s)",
                (batch,),
            )
            timings[mode].append(time.perf_counter() - started)
    conn.execute("ALTER TABLE job_items ENABLE TRIGGER job_items_record_usage")
    return {mode: summary(values) for mode, values in timings.items()}


def reads(url: str, stores: int, days: int, samples: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO store_usage_daily (instance_id, day, model, served_tier, items,"
            " prompt_tokens, cached_tokens, completion_tokens)"
            " SELECT 'store-' || s, (now() AT TIME ZONE 'UTC')::date - d, 'gpt-4o-mini', t,"
            " 100, 12000, 0, 8000 FROM generate_series(1, %s) s,"
            " generate_series(0, %s) d, unnest(ARRAY['realtime', 'batch']) t",
            (stores, days - 1),
        )
        conn.execute(
            "INSERT INTO store_usage_monthly SELECT instance_id, date_trunc('month', day)::date,"
            " model, served_tier, sum(items), sum(prompt_tokens), sum(cached_tokens),"
            " sum(completion_tokens) FROM store_usage_daily GROUP BY 1, 2, 3, 4"
        )
        conn.execute(
            "INSERT INTO store_usage_recent (instance_id, day, model, served_tier, items,"
            " prompt_tokens, cached_tokens, completion_tokens)"
            " SELECT 'store-' || (1 + n %% %s), (now() AT TIME ZONE 'UTC')::date, 'gpt-4o-mini',"
            " 'realtime', 1, 120, 0, 80 FROM generate_series(1, 20000) n",
            (stores,),
        )
        conn.execute("VACUUM (ANALYZE) store_usage_daily, store_usage_monthly, store_usage_recent")
        daily = conn.execute("SELECT count(*) FROM store_usage_daily").fetchone()
        blocks = queries("usage")
        from_daily = sql(NAME)["fleet_usage_from_daily"]
        one, fleet, daily_scan = [], [], []
        # The database's own time (EXPLAIN ANALYZE's execution time: no transfer, no parsing of
        # the 40,000 rows both readings return), interleaved too.
        server: dict[str, list[float]] = {"monthly": [], "daily": []}
        for n in range(samples):
            started = time.perf_counter()
            conn.execute(blocks["store_usage"], {"store": "store-7"}).fetchall()
            one.append(time.perf_counter() - started)
            # Interleaved, the order alternating: the two readings share the machine's load.
            for which in ("monthly", "daily") if n % 2 == 0 else ("daily", "monthly"):
                started = time.perf_counter()
                if which == "monthly":
                    rows = conn.execute(blocks["fleet_usage"]).fetchall()
                    fleet.append(time.perf_counter() - started)
                else:
                    conn.execute(from_daily).fetchall()
                    daily_scan.append(time.perf_counter() - started)
                query = blocks["fleet_usage"] if which == "monthly" else from_daily
                plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}").fetchone()
                assert plan is not None
                server[which].append(plan[0][0]["Execution Time"] / 1000)
    return {
        "stores": stores,
        "daily_rows": int(daily[0]) if daily else 0,
        "fleet_rows_returned": len(rows),
        "one_store": summary(one),
        "fleet": summary(fleet),
        "fleet_from_daily": summary(daily_scan),
        "ratio_p50": summary(daily_scan)["p50"] / summary(fleet)["p50"],
        "server_monthly": summary(server["monthly"]),
        "server_daily": summary(server["daily"]),
        "server_ratio_p50": summary(server["daily"])["p50"] / summary(server["monthly"])["p50"],
    }


def run(quick: bool) -> dict[str, Any]:
    with scratch_database(NAME) as url:
        written = writes(url, 10 if quick else 40)
    with scratch_database(NAME) as url:
        read = reads(url, 1_000 if quick else 10_000, 31, 5 if quick else 15)
    return {"quick": quick, "writes": written, "reads": read}


def _ms(figures: dict[str, float]) -> list[str]:
    return [f"{figures['p50'] * 1000:.2f}", f"{figures['p99'] * 1000:.2f}"]


def main() -> None:
    args = parse_args(__doc__)
    result = run(args.quick)
    w, r = result["writes"], result["reads"]
    console.print(
        table(
            "what costs cost",
            ["measure", "p50 ms", "p99 ms"],
            [
                [f"finish {BATCH} items, trigger on", *_ms(w["trigger_on"])],
                [f"finish {BATCH} items, trigger off", *_ms(w["trigger_off"])],
                ["claim 20 items, trigger on", *_ms(w["claim_trigger_on"])],
                ["claim 20 items, trigger off", *_ms(w["claim_trigger_off"])],
                ["one store's month", *_ms(r["one_store"])],
                [f"fleet's month ({r['stores']:,} stores): monthly rollup", *_ms(r["fleet"])],
                [f"fleet's month: the {r['daily_rows']:,} daily rows", *_ms(r["fleet_from_daily"])],
                ["  the same in the database: monthly rollup", *_ms(r["server_monthly"])],
                ["  the same in the database: daily rows", *_ms(r["server_daily"])],
            ],
        )
    )  # fmt: skip
    console.print(
        f"trigger on / off, p50: finish {w['ratio_p50']:.2f}, claim {w['claim_ratio_p50']:.2f}"
    )
    console.print(
        f"fleet's month, daily rows / monthly rollup, p50: {r['ratio_p50']:.1f} at the client, "
        f"{r['server_ratio_p50']:.1f} in the database"
    )
    if not args.quick:
        write_json(NAME, result)


if __name__ == "__main__":
    main()
