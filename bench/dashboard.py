"""The dashboard's cost: database and server time per refresh, bytes per refresh, and what
fifty open pages cost, at 10,000 stores with 1,000,000 PENDING items (--quick: 100,000).

Every query behind the shared snapshot is timed with EXPLAIN (ANALYZE, BUFFERS); a refresh is
timed whole (database and Python); the live fragment is rendered for the first page of stores,
raw and gzipped as a browser receives it; then fifty HTTP clients poll the real app once a second
and the snapshot's readings are counted against the fragments served.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time
from typing import Any

import anyio
import httpx
import psycopg
from starlette.requests import Request

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
    table,
    timed,
)
from listener.db import open_pool
from listener.http import app as http
from listener.http.dashboard import Dashboard
from listener.http.dashboard import _html as render
from listener.http.serve import serving
from listener.http.snapshot import IN_FLIGHT_LIMIT, RECENT_JOBS, SharedSnapshot
from listener.settings import load_settings
from listener.sqlfiles import queries

NAME = "dashboard"
STORES = 10_000
PAGES = 50
TOKEN = "bench-dashboard-token-0123456789"


def _explain(url: str, block: str, params: dict[str, Any]) -> dict[str, float]:
    """Execution time (ms) and shared buffers touched of one query, serial like the census."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(queries("dashboard")["census_serial"])
        sql = queries("dashboard")[block]
        row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params).fetchone()
    assert row is not None
    plan = row[0][0]
    buffers = plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get("Shared Read Blocks", 0)
    return {"ms": float(plan["Execution Time"]), "buffers": int(buffers)}


def _fake_fleet(url: str) -> None:
    """Two live workers' heartbeats and 64 items in flight, as a busy fleet has them."""
    stats = {
        "inFlight": 32,
        "pool": {"total": 3, "idle": 2, "waiting": 0, "max": 4},
        "requestsInLastMinute": 440,
        "tokensInLastMinute": 98_000,
        "rpm": 450,
        "tpm": 200_000,
        "finishedPerMinute": {str(int(time.time() // 60) - m): 440 for m in range(15)},
        "finishedLastMinuteByStore": {f"store-{n:05}": 1 for n in range(220)},
    }
    with psycopg.connect(url, autocommit=True) as conn:
        for n in (1, 2):
            conn.execute(
                "INSERT INTO worker_heartbeats (worker_id, hostname, pid, listener_connected,"
                " stats) VALUES (%s, 'bench', %s, true, %s)",
                (f"bench-{n}", n, json.dumps(stats)),
            )
        conn.execute(
            "UPDATE job_items SET status = 'PROCESSING', claimed_by = 'bench-1',"
            " claimed_at = now(), lease_expires_at = now() + interval '1 minute'"
            " WHERE id IN (SELECT id FROM job_items WHERE status = 'PENDING' ORDER BY id LIMIT 64)"
        )


async def _measure(url: str, quick: bool) -> dict[str, Any]:
    settings = load_settings(api_token=TOKEN, rate_limit_rpm=450)
    pool = await open_pool(url, settings, name="bench-dashboard")
    try:
        snapshot = SharedSnapshot(pool, settings)
        started = time.perf_counter()
        await snapshot.get()
        first = time.perf_counter() - started
        refreshes, live_db = [], []
        for _ in range(10 if quick else 20):
            snapshot.taken = float("-inf")
            snapshot.census.taken = time.monotonic()  # live tier alone
            started = time.perf_counter()
            current = await snapshot.get()
            refreshes.append((time.perf_counter() - started) * 1000)
            assert current is not None
            live_db.append(current.timings.live_ms)
        census = []
        for _ in range(3):
            started = time.perf_counter()
            await snapshot._census_alone()
            census.append((time.perf_counter() - started) * 1000)
        current = await snapshot.get()
        assert current is not None

        # The fragment as the first page of stores renders it, raw and gzipped.
        dashboard = Dashboard(pool, settings, snapshot)
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        render("live.html", **dashboard._context(Request(scope), current))  # compiles it once
        started = time.perf_counter()
        body = bytes(render("live.html", **dashboard._context(Request(scope), current)).body)
        render_ms = (time.perf_counter() - started) * 1000
        gzipped = len(gzip.compress(body, compresslevel=5))

        polled = await _fifty_pages(pool, settings, 5.0 if quick else 10.0)
    finally:
        await pool.close()
    return {
        "first_reading_ms": first * 1000,
        "load_average": os.getloadavg()[0],
        "refresh_ms": statistics.median(refreshes),
        "live_db_ms": statistics.median(live_db),
        "census_ms": statistics.median(census),
        "census_period_s": max(snapshot.period, 20 * snapshot.census.duration),
        "render_ms": render_ms,
        "fragment_bytes": len(body),
        "fragment_gzip_bytes": gzipped,
        "fifty_pages": polled,
    }


async def _fifty_pages(pool: Any, settings: Any, seconds: float) -> dict[str, Any]:
    app = http.build_app(pool, settings)
    dashboard: Dashboard = app.state.dashboard
    received = 0
    async with serving(app, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.port}"
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept-Encoding": "gzip"}
        before = dashboard.snapshot.refreshes
        started = anyio.current_time()

        async def page(client: httpx.AsyncClient) -> None:
            nonlocal received
            while anyio.current_time() - started < seconds:
                response = await client.get("/dashboard/live", headers=headers)
                received += int(response.headers.get("content-length", 0))
                await anyio.sleep(1.0)

        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(PAGES):
                tg.start_soon(page, client)
        elapsed = anyio.current_time() - started
    return {
        "pages": PAGES,
        "seconds": round(elapsed, 1),
        "fragments": dashboard.live_served,
        "readings": dashboard.snapshot.refreshes - before,
        "bytes_per_fragment": received // max(1, dashboard.live_served),
    }


def run(quick: bool) -> dict[str, Any]:
    per_store = 10 if quick else 100
    with scratch_database(NAME) as url:
        stores = [f"store-{n:05}" for n in range(STORES)]
        with progress() as bar:
            load_in_chunks(url, stores, per_store, bar)
        _fake_fleet(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) job_items")
        explained = {
            "limiter": _explain(url, "limiter", {"name": "openai"}),
            "live_workers": _explain(url, "live_workers", {"stale_seconds": 15.0}),
            "in_flight": _explain(url, "in_flight", {"limit": IN_FLIGHT_LIMIT}),
            "recent_jobs": _explain(url, "recent_jobs", {"limit": RECENT_JOBS}),
            "store_policies": _explain(url, "store_policies", {}),
            "store_backlog": _explain(url, "store_backlog", {}),
            "latest_jobs": _explain(url, "latest_jobs", {"stores": stores}),
        }
        measured = anyio.run(_measure, url, quick)
    return {
        "stores": STORES,
        "pending": STORES * per_store,
        "queries": explained,
        **measured,
    }


HEADERS = ["query", "tier", "ms", "buffers"]
CENSUS = {"store_backlog", "latest_jobs"}


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [name, "census" if name in CENSUS else "live", f"{q['ms']:.2f}", f"{q['buffers']:,}"]
        for name, q in result["queries"].items()
    ]


def report(result: dict[str, Any]) -> str:
    title = f"Dashboard queries, {result['stores']:,} stores, {result['pending']:,} PENDING"
    table(title, HEADERS, rows(result))
    fifty = result["fifty_pages"]
    lines = [
        f"refresh (live tier, database and Python): {result['refresh_ms']:.1f} ms median, "
        f"of which database {result['live_db_ms']:.1f} ms",
        f"census (every store's backlog): {result['census_ms']:.0f} ms, so it runs every "
        f"{result['census_period_s']:.1f} s (at most 1/20 of one core)",
        f"live fragment: {result['fragment_bytes']:,} bytes, {result['fragment_gzip_bytes']:,} "
        f"gzipped; rendered in {result['render_ms']:.1f} ms",
        f"machine's load average during the run: {result['load_average']:.1f} on "
        f"{os.cpu_count()} cores",
        f"{fifty['pages']} pages polling for {fifty['seconds']} s: {fifty['fragments']} fragments "
        f"served from {fifty['readings']} readings of the database "
        f"({fifty['bytes_per_fragment']:,} bytes each on the wire)",
    ]
    for line in lines:
        console.print(line)
    return markdown_table(HEADERS, rows(result)) + "\n\n" + "\n".join(f"- {x}" for x in lines)


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 3.5)
    names = list(result["queries"])
    ax.barh(names, [result["queries"][n]["ms"] for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("execution time (ms, log)")
    ax.set_title(f"Dashboard queries at {result['pending']:,} PENDING, {result['stores']:,} stores")
    save_figure(fig, NAME)


def main(quick: bool) -> dict[str, Any]:
    return publish(NAME, run(quick), report, plot)


if __name__ == "__main__":
    timed(main, parse_args(__doc__).quick)
