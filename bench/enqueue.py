"""6. Enqueue throughput: a 10,000-product job written by the producer API (`listener.enqueue`,
one COPY) against one INSERT per item, `executemany` (psycopg pipelines it), the JSON-array
INSERT the producer used before, and the batch enqueue of three PostgreSQL queues, pgqueuer,
procrastinate and Graphile Worker (its `add_jobs`, the SQL function its `addJobs` calls, with
the same products as payloads), measured here on the same database (`pip install -e
'.[peers]'`; Graphile's schema installed by its own migrations through node, see
bench.peer_systems; each is skipped when not installed). A --quick run writes enqueue_quick.*.

Each method writes the same 10,000 products (about 200 bytes of JSON each), in one transaction,
from a fresh connection already open; the tables are emptied between runs. Reported: the median
of the runs, as items per second, and the time for the whole job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.common import (
    console,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    save_figure,
    scratch_database,
    sql,
    table,
    timed,
)
from listener import enqueue
from listener.jobs import sample_products
from listener.producer import prepare

NAME = "enqueue"
ITEMS = 10_000
STORE = "store-bench"
METHODS = {
    "listener_copy": "listener.enqueue (COPY)",
    "json_array": "one INSERT from a JSON array",
    "executemany": "executemany (pipelined INSERTs)",
    "insert_per_item": "one INSERT per item",
    "pgqueuer": "pgqueuer Queries.enqueue (batch)",
    "procrastinate": "procrastinate batch_defer",
    "graphile": "graphile-worker add_jobs (batch)",
}
TARGET = 50_000  # items per second
PEER_TABLES = {
    "pgqueuer": "TRUNCATE pgqueuer",
    "procrastinate": "TRUNCATE procrastinate_jobs CASCADE",
    "graphile": "TRUNCATE graphile_worker._private_jobs CASCADE",
}


def _job(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (STORE,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def listener_copy(url: str, products: list[dict[str, Any]]) -> Callable[[], None]:
    conn = psycopg.connect(url)

    def run() -> None:
        enqueue(conn, STORE, products)  # an idle connection: the call commits

    return run


def json_array(url: str, products: list[dict[str, Any]]) -> Callable[[], None]:
    conn = psycopg.connect(url)

    def run() -> None:
        with conn.transaction():
            params = {"job_id": _job(conn), "instance_id": STORE, "products": json.dumps(products)}
            conn.execute(sql("queries")["enqueue_json_array"], params)

    return run


def _rows(job_id: int, products: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"job_id": job_id, "instance_id": STORE, "product_id": p["id"], "payload": json.dumps(p)}
        for p in products
    ]


def executemany(url: str, products: list[dict[str, Any]]) -> Callable[[], None]:
    conn = psycopg.connect(url)

    def run() -> None:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(sql("queries")["enqueue_one_item"], _rows(_job(conn), products))

    return run


def insert_per_item(url: str, products: list[dict[str, Any]]) -> Callable[[], None]:
    conn = psycopg.connect(url)

    def run() -> None:
        with conn.transaction():
            for row in _rows(_job(conn), products):
                conn.execute(sql("queries")["enqueue_one_item"], row)

    return run


def pgqueuer_batch(url: str, products: list[dict[str, Any]]) -> Callable[[], None] | None:
    try:
        from pgqueuer.queries import Queries
    except ImportError:
        return None
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(psycopg.AsyncConnection.connect(url, autocommit=True))
    queries = Queries.from_psycopg_connection(conn)
    if not loop.run_until_complete(queries.schema_is_installed()):
        loop.run_until_complete(queries.install())
    payloads: list[bytes | None] = [json.dumps(p).encode() for p in products]
    names = ["describe"] * len(products)
    priorities = [0] * len(products)

    def run() -> None:
        loop.run_until_complete(queries.enqueue(names, payloads, priorities))

    return run


def graphile_batch(url: str, products: list[dict[str, Any]]) -> Callable[[], None] | None:
    from bench.peer_systems import install

    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    install("graphile", url)
    conn = psycopg.connect(url)

    def run() -> None:
        # As its addJobs does: the specs encoded in one call, sent as one parameter.
        specs = json.dumps([{"identifier": "describe", "payload": p} for p in products])
        with conn.transaction():
            conn.execute(sql("peers")["add_jobs_graphile_payloads"], {"specs": specs}).fetchall()

    return run


def procrastinate_batch(url: str, products: list[dict[str, Any]]) -> Callable[[], None] | None:
    try:
        import procrastinate
    except ImportError:
        return None
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=url))
    app.open()

    @app.task(name="describe")
    def describe(product: dict[str, Any]) -> None:
        """Never runs: only deferred."""

    # Applied once per scratch database; a second apply fails on the existing objects.
    with contextlib.suppress(Exception):
        app.schema_manager.apply_schema()
    kwargs: list[dict[str, Any]] = [{"product": p} for p in products]

    def run() -> None:
        describe.batch_defer(*kwargs)

    return run


BUILDERS: dict[str, Callable[[str, list[dict[str, Any]]], Callable[[], None] | None]] = {
    "listener_copy": listener_copy,
    "json_array": json_array,
    "executemany": executemany,
    "insert_per_item": insert_per_item,
    "pgqueuer": pgqueuer_batch,
    "procrastinate": procrastinate_batch,
    "graphile": graphile_batch,
}


def run(quick: bool) -> dict[str, Any]:
    runs = 3 if quick else 7
    products = sample_products(ITEMS, STORE)
    for product in products:
        product["id"] = str(product["id"])
    results: dict[str, Any] = {}
    with scratch_database("enqueue") as url:
        for method, build in BUILDERS.items():
            write = build(url, products)
            if write is None:
                console.print(f"[dim]{method}: not installed, skipped[/dim]")
                continue
            timings = []
            for _ in range(runs + 1):  # the first run warms the caches and is dropped
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute(sql("queries")["empty_jobs"])
                    if method in PEER_TABLES:
                        admin.execute(PEER_TABLES[method])
                started = time.perf_counter()
                write()
                timings.append(time.perf_counter() - started)
            median = statistics.median(timings[1:])
            results[method] = {
                "seconds": median,
                "items_per_second": ITEMS / median,
                "best_items_per_second": ITEMS / min(timings[1:]),
                "runs": timings[1:],
            }
        checks = []
        for _ in range(runs):
            started = time.perf_counter()
            prepare(STORE, products)
            checks.append(time.perf_counter() - started)
    return {
        "quick": quick,
        "items": ITEMS,
        "methods": METHODS,
        "target": TARGET,
        "results": results,
        "checks_seconds": statistics.median(checks),
        "load_average": os.getloadavg()[0],
    }


HEADERS = [
    "method",
    "10,000 items in (median)",
    "items/s (median)",
    "items/s (best)",
    "vs listener.enqueue",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    own = result["results"]["listener_copy"]["items_per_second"]
    return [
        [
            result["methods"][method],
            f"{stats['seconds'] * 1000:,.0f} ms",
            f"{stats['items_per_second']:,.0f}",
            f"{stats['best_items_per_second']:,.0f}",
            "1" if method == "listener_copy" else f"{stats['items_per_second'] / own:.2f}x",
        ]
        for method, stats in sorted(
            result["results"].items(), key=lambda kv: -kv[1]["items_per_second"]
        )
    ]


def note(result: dict[str, Any]) -> str:
    return (
        f"listener.enqueue's own checks and JSON encoding: "
        f"{result['checks_seconds'] * 1000:.0f} ms of it; the rest is PostgreSQL writing the rows "
        f"and their 8 indexes. Load average during the run: {result['load_average']:.1f} "
        "(on 2 cores)."
    )


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result)) + "\n\n" + note(result) + "\n"


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    ordered = sorted(result["results"].items(), key=lambda kv: kv[1]["items_per_second"])
    ax.barh(
        [result["methods"][m] for m, _ in ordered],
        [s["items_per_second"] for _, s in ordered],
        color=["tab:green" if m == "listener_copy" else "tab:gray" for m, _ in ordered],
    )
    ax.axvline(result["target"], color="tab:red", linestyle="--", label="target 50,000/s")
    ax.set_xlabel("items enqueued per second (10,000-item job)")
    ax.legend()
    save_figure(fig, NAME if not result["quick"] else f"{NAME}_quick")


def main(quick: bool) -> dict[str, Any]:
    result = run(quick)
    table("Enqueue: one 10,000-product job", HEADERS, rows(result))
    console.print(note(result))
    # A quick run never replaces a full run's committed figures.
    return publish(NAME if not quick else f"{NAME}_quick", result, report, plot)


if __name__ == "__main__":
    args = parse_args(__doc__)
    timed(main, args.quick)
