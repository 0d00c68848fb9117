"""Health, fleet stats and metrics over real HTTP (uvicorn), against real PostgreSQL."""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from listener.db import open_pool
from listener.errors import ListenerError
from listener.http import app as http
from listener.http import fleet
from listener.http.serve import serving
from listener.stub.server import StubConfig, run_stub
from tests.conftest import Server
from tests.support import (
    api_process,
    insert_job,
    query,
    running_worker,
    wait_for_counts,
    wait_until,
    worker_is_ready,
)
from tests.support import make_settings as make_settings

pytestmark = pytest.mark.anyio

STATS_KEYS = {
    "queueLength",
    "requestsInLastMinute",
    "rpmUsagePercent",
    "rpmLimit",
    "tokensInLastMinute",
    "tpmLimit",
    "tpmUsagePercent",
    "waiters",
    "inFlight",
    "processing",
    "pending",
    "rateLimitedTotal",
    "pausedUntil",
    "workers",
    "countsEstimated",
}


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def heartbeat_counts(conninfo: str) -> tuple[int, int]:
    """Requests in the last minute and items completed, as the fleet's heartbeats say."""
    rows = await query(
        conninfo,
        "SELECT coalesce(sum((stats->>'requestsInLastMinute')::int), 0),"
        " coalesce(sum((stats->>'completed')::int), 0) FROM worker_heartbeats",
    )
    return int(rows[0][0]), int(rows[0][1])


async def test_endpoints_report_the_fleet_while_a_worker_runs(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        # A budget makes the limiter the shared one; a 2 s lease makes heartbeats ~0.7 s apart.
        settings = make_settings(
            stub.base_url, rate_limit_rpm=6000, rate_limit_tpm=10_000_000, lease_seconds=2
        )
        async with (
            running_worker(database_url, settings) as worker,
            serving(http.build_app(worker.pool, settings, worker), "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            await insert_job(database_url, "store-H", 5)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 5)

            # The rows are written before the worker counts them, and a beat may fall between.
            async def beats_show_the_work() -> bool:
                return min(await heartbeat_counts(database_url)) >= 5

            await wait_until(beats_show_the_work)

            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json() == {
                "status": "ok",
                "database": "ok",
                "listener": "connected",
                "workers": 1,
            }

            stats = await client.get("/api/rate-limiter/stats")
            assert stats.status_code == 200
            body = stats.json()
            assert body["status"] == "ok"
            limiter = body["rateLimiter"]
            assert set(limiter) == STATS_KEYS
            assert limiter["requestsInLastMinute"] >= 5
            assert limiter["rpmLimit"] == 6000
            expected = round(100 * limiter["requestsInLastMinute"] / 6000, 1)
            assert limiter["rpmUsagePercent"] == expected
            assert isinstance(limiter["rpmUsagePercent"], float)
            assert limiter["tokensInLastMinute"] > 0
            assert (limiter["queueLength"], limiter["processing"], limiter["workers"]) == (0, 0, 1)
            assert limiter["rateLimitedTotal"] == 0
            assert limiter["pausedUntil"] is None

            assert limiter["countsEstimated"] is False
            await insert_job(database_url, "store-I", 1)
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            samples = metric_samples(metrics.text)
            worker_label = (("worker", worker.worker_id),)
            assert ("listener_items", (("status", "pending"),)) in samples
            assert ("listener_items", (("status", "processing"),)) in samples
            assert samples["listener_database_up", ()] == 1
            assert samples["listener_workers", ()] == 1
            assert samples["listener_requests_last_minute", ()] >= 5
            assert samples["listener_rpm_limit", ()] == 6000
            assert samples["listener_items_completed_total", worker_label] >= 5
            assert samples["listener_claimed_items_total", worker_label] >= 5
            assert samples["listener_rate_limited_total", ()] == 0
            assert samples["listener_worker_listener_connected", worker_label] == 1
            assert samples["listener_db_pool_max_connections", ()] == settings.db_pool_max
            assert ("listener_db_pool_connections", (("state", "idle"),)) in samples


async def test_serve_worker_http_serves_on_port_until_cancelled(
    database_url: str, free_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_tcp_port
    settings = make_settings("http://127.0.0.1:9/v1", port=port)
    pool = await open_pool(database_url, settings, name="test-http")
    try:
        with caplog.at_level(logging.INFO, logger="listener.http.app"):
            async with anyio.create_task_group() as tg:
                await tg.start(http.serve_worker_http, settings, pool, None)
                async with httpx.AsyncClient() as client:
                    response = await client.get(f"http://127.0.0.1:{port}/health")
                tg.cancel_scope.cancel()
        assert response.status_code == 200
        assert response.json()["listener"] == "not running"
        # Loopback by default (HTTP_HOST), and the line says so.
        serving_line = (
            f"[HTTP] serving the dashboard, health, stats and metrics on port {port} (127.0.0.1; "
        )
        assert any(message.startswith(serving_line) for message in caplog.messages)
        # The socket is closed once the server task returns.
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)
    finally:
        await pool.close()


async def test_health_is_503_while_the_worker_s_listener_is_down(database_url: str) -> None:
    settings = make_settings("http://127.0.0.1:9/v1")
    pool = await open_pool(database_url, settings, name="test-http")
    worker = SimpleNamespace(
        listener=SimpleNamespace(connected=False),
        settings=settings,
        last_beat=time.monotonic(),
        live_workers=1,
    )
    try:
        app = http.build_app(pool, settings, cast(Any, worker))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/health")
            assert response.status_code == 503
            assert response.json()["listener"] == "disconnected"
            assert response.json()["status"] == "error"
            worker.listener.connected = True
            assert (await client.get("/health")).status_code == 200
    finally:
        await pool.close()


async def test_endpoints_report_a_database_that_is_gone(
    pg_server: Server, migrated_template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the pool's connection is gone, each request waits this long for a new one.
    monkeypatch.setattr(fleet, "DB_TIMEOUT_SECONDS", 0.3)
    name = f"listener_http_gone_{os.getpid()}"
    await query(
        pg_server.conninfo("postgres"), f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"'
    )
    settings = make_settings("http://127.0.0.1:9/v1", db_pool_min=1)
    pool = await open_pool(pg_server.conninfo(name), settings, name="test-http")
    try:
        app = http.build_app(pool, settings)
        async with (
            serving(app, "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            assert (await client.get("/health")).json()["workers"] == 0
            await query(pg_server.conninfo("postgres"), f'DROP DATABASE "{name}" WITH (FORCE)')

            # /health shares one reading a second: the outage shows by the next one.
            async def health_fails() -> bool:
                return (await client.get("/health")).status_code == 503

            await wait_until(health_fails)
            health = await client.get("/health")
            body = health.json()
            assert (body["status"], body["database"]) == ("error", "error")
            assert body["error"].startswith("database unreachable")

            stats = await client.get("/api/rate-limiter/stats")
            assert stats.status_code == 503
            assert stats.json()["status"] == "error"

            # /metrics still answers, so the outage itself can be scraped and alerted on.
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            samples = metric_samples(metrics.text)
            assert samples["listener_database_up", ()] == 0
            assert ("listener_db_pool_connections", (("state", "total"),)) in samples
    finally:
        await pool.close()
        await query(
            pg_server.conninfo("postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )


async def test_api_command_serves_health_and_exits_0_on_sigterm(
    database_url: str, free_tcp_port: int
) -> None:
    port = free_tcp_port
    # api_process waits for the serving line and checks the exit code after SIGTERM.
    async with (
        api_process("--port", str(port), DATABASE_URL=database_url),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "listener": "not running",
        "workers": 0,
    }


async def test_a_port_in_use_is_one_clear_error() -> None:
    app = http.build_app(cast(Any, None), make_settings("http://127.0.0.1:9/v1"))
    async with serving(app, "127.0.0.1", 0) as taken:
        with pytest.raises(ListenerError, match="cannot serve HTTP"):
            async with serving(app, "127.0.0.1", taken.port):
                pass


async def test_counts_above_the_cap_are_the_planners_estimate(database_url: str) -> None:
    await insert_job(database_url, "store-big", 3000)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_items SET run_after = now() + interval '1 hour' WHERE id % 3 = 0")
        conn.execute("ANALYZE job_items")
    settings = make_settings("http://127.0.0.1:9")
    pool = await open_pool(database_url, settings, name="test-http")
    try:
        exact = await fleet.fetch_fleet(pool, settings)
        capped = await fleet.fetch_fleet(pool, settings, cap=100)
    finally:
        await pool.close()
    assert (exact.pending, exact.ready, exact.estimated) == (3000, 2000, False)
    assert capped.estimated
    # The planner's estimates after ANALYZE.
    assert 2700 <= capped.pending <= 3300
    assert 1700 <= capped.ready <= 2300


async def test_the_snapshot_is_shared_by_requests_and_refreshed_after_max_age(
    database_url: str,
) -> None:
    settings = make_settings("http://127.0.0.1:9")
    pool = await open_pool(database_url, settings, name="test-http")
    now = [0.0]
    snapshot = fleet.FleetSnapshot(pool, settings, max_age=1.0, clock=lambda: now[0])
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(snapshot.get)
        assert snapshot.readings == 1
        await insert_job(database_url, "store-S", 4)
        now[0] = 0.9
        assert (await snapshot.get()).pending == 0
        now[0] = 1.0
        assert (await snapshot.get()).pending == 4
        assert snapshot.readings == 2
    finally:
        await pool.close()


async def test_health_takes_nothing_from_the_worker_s_pool(database_url: str) -> None:
    """/health is open to anyone: a flood of it must not queue for the worker's few connections
    (the lease renewals wait in that queue). It answers from the heartbeat, and keeps
    answering while every connection of the pool is taken."""
    settings = make_settings("http://127.0.0.1:9/v1", db_pool_max=2, db_pool_min=2)
    # The app's pool stands for the worker's: used by nothing else here, so that the worker's
    # own claims and beats do not move its counts.
    pool = await open_pool(database_url, settings, name="test-health-pool")
    try:
        async with running_worker(database_url, settings) as worker:
            await wait_until(lambda: worker_is_ready(database_url, os.getpid()))
            transport = httpx.ASGITransport(app=http.build_app(pool, settings, worker))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                before = pool.get_stats().get("requests_num", 0)
                for _ in range(200):
                    response = await client.get("/health")
                    assert response.status_code == 200
                assert pool.get_stats().get("requests_num", 0) == before
                # Every connection held elsewhere (as a flood of queries would): still 200.
                async with pool.connection() as one, pool.connection() as two:
                    assert one is not two
                    response = await client.get("/health")
                    assert response.status_code == 200, response.text
                    assert response.json() == {
                        "status": "ok",
                        "database": "ok",
                        "listener": "connected",
                        "workers": 1,
                    }
    finally:
        await pool.close()
