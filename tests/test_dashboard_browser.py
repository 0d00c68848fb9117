"""The operators' dashboard in a real browser: headless Chromium (Debian's) driven by Playwright,
against the real HTTP app, a real worker, the real PostgreSQL and the OpenAI stub."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from psycopg_pool import AsyncConnectionPool

from listener.db import open_pool
from listener.http import app as http
from listener.http.dashboard import Dashboard
from listener.http.serve import serving
from listener.settings import Settings
from listener.stub.server import StubConfig, run_stub
from tests.conftest import CHROMIUM_ARGS
from tests.support import (
    SLACK,
    insert_job,
    make_settings,
    query,
    query_blocking,
    running_worker,
    wait_until,
)

pytestmark = pytest.mark.anyio

TOKEN = "dashboard-test-token-0123456789"
# Playwright's waits poll the page for a condition; this bounds each, so a broken page fails.
WAIT_MS = int(20_000 * SLACK)
# Every `expect` too (its own default, 5 s, is short for a machine running other suites).
expect.set_options(timeout=WAIT_MS)


@asynccontextmanager
async def chromium(path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def dashboard_server(
    pool: AsyncConnectionPool, settings: Settings, worker: Any = None
) -> AsyncIterator[tuple[str, Dashboard]]:
    app = http.build_app(pool, settings, worker)
    async with serving(app, "127.0.0.1", 0) as server:
        yield f"http://127.0.0.1:{server.port}", app.state.dashboard


async def sign_in(page: Page, base: str, token: str = TOKEN) -> None:
    await page.goto(base + "/")
    await expect(page).to_have_url(base + "/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def test_the_page_loads_behind_the_token_and_refuses_a_wrong_one(
    database_url: str, chromium_path: str
) -> None:
    settings = make_settings("http://127.0.0.1:9/v1", api_token=TOKEN)
    pool = await open_pool(database_url, settings, name="dashboard-test")
    try:
        async with dashboard_server(pool, settings) as (base, _), chromium(chromium_path) as b:
            page = await b.new_page()
            await sign_in(page, base, token="not-the-token-0123456789")
            await expect(page.get_by_role("alert")).to_have_text("wrong token")
            await expect(page).to_have_url(base + "/login")
            # Without a session the live fragment is refused too.
            response = await page.request.get(base + "/dashboard/live")
            assert response.status == 401

            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await expect(page).to_have_url(base + "/")
            await expect(page.get_by_role("heading", name="Workers")).to_be_visible()
            html = await page.content()
            assert TOKEN not in html  # the token never reaches the page
            assert "test-key" not in html  # nor the OpenAI key
            # /health stays open; the session cookie opens the dashboard only, not /metrics.
            assert (await page.request.get(base + "/health")).status in (200, 503)
            assert (await page.request.get(base + "/metrics")).status == 401
    finally:
        await pool.close()


async def test_it_shows_a_running_workers_stores_and_updates_as_items_complete(
    database_url: str, chromium_path: str
) -> None:
    async with run_stub(StubConfig(latency=0.4)) as stub:
        settings = make_settings(
            stub.base_url, api_token=TOKEN, worker_concurrency=2, lease_seconds=2
        )
        async with (
            running_worker(database_url, settings) as worker,
            dashboard_server(worker.pool, settings, worker) as (base, _),
            chromium(chromium_path) as browser,
        ):
            page = await browser.new_page()
            await sign_in(page, base)
            workers = page.locator(f"tr[data-worker='{worker.worker_id}']")
            await expect(workers).to_contain_text("connected", timeout=WAIT_MS)

            # The job arrives after the page loaded: it appears without a reload. Its store is
            # paused until the page has shown it pending (a loaded machine could otherwise
            # finish the job between two of the page's readings), then the row follows it.
            await query(
                database_url,
                "INSERT INTO stores (instance_id, paused) VALUES ('store-browser', true)"
                " RETURNING instance_id",
            )
            job_id = await insert_job(database_url, "store-browser", 12)
            row = page.locator("tr[data-store='store-browser']")
            await expect(row).to_be_visible(timeout=WAIT_MS)
            job = page.locator(f"tr[data-job='{job_id}']")
            await expect(job).to_contain_text("pending", timeout=WAIT_MS)
            await query(
                database_url,
                "DELETE FROM stores WHERE instance_id = 'store-browser' RETURNING instance_id",
            )
            await expect(job).to_contain_text("12 completed", timeout=WAIT_MS)
            await expect(job).to_contain_text("COMPLETED", timeout=WAIT_MS)
            # Its throughput reached the chart's figures (from the workers' heartbeats).
            await expect(page.locator("#items-per-minute")).not_to_have_text("0", timeout=WAIT_MS)
            # Done: the store has no more work, so it leaves the table.
            await expect(row).to_have_count(0, timeout=WAIT_MS)


async def test_why_waiting_says_backoff_until_a_time(database_url: str, chromium_path: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, api_token=TOKEN, lease_seconds=2)
        job_id = await insert_job(database_url, "store-backoff", 3)
        # As a retry leaves them: PENDING, due in ten minutes.
        await query(
            database_url,
            "UPDATE job_items SET run_after = now() + interval '10 minutes', attempts = 1"
            " WHERE job_id = %s RETURNING id",
            (job_id,),
        )
        async with (
            running_worker(database_url, settings) as worker,
            dashboard_server(worker.pool, settings, worker) as (base, _),
            chromium(chromium_path) as browser,
        ):
            page = await browser.new_page()
            await sign_in(page, base)
            row = page.locator("tr[data-store='store-backoff']")
            await expect(row.locator("td.why")).to_contain_text(
                "in backoff after a failed try until", timeout=WAIT_MS
            )
            await expect(row.locator("td.why")).to_contain_text("(in 10 min)")
            job = page.locator(f"tr[data-job='{job_id}'] td.why")
            await expect(job).to_contain_text("in backoff after a failed try until")


async def test_fifty_open_pages_cost_the_database_what_one_does(
    database_url: str, chromium_path: str
) -> None:
    settings = make_settings("http://127.0.0.1:9/v1", api_token=TOKEN)
    for n in range(30):
        await insert_job(database_url, f"store-{n:03}", 5)
    name = "dashboard-fifty"
    before = committed_transactions(database_url)
    opened = anyio.current_time()
    pool = await open_pool(database_url, settings, name=name)
    try:
        async with (
            dashboard_server(pool, settings) as (base, dashboard),
            chromium(chromium_path) as browser,
        ):
            context = await browser.new_context()
            first = await context.new_page()
            await sign_in(first, base)  # the context's pages share the session cookie
            pages = [first] + [await context.new_page() for _ in range(49)]
            async with anyio.create_task_group() as tg:
                for page in pages[1:]:
                    # Fifty tabs load at once on two cores: a generous bound, not a speed test.
                    load = partial(page.goto, wait_until="domcontentloaded", timeout=120_000)
                    tg.start_soon(load, base + "/")
            served_before = dashboard.live_served
            refreshes_before = dashboard.snapshot.refreshes
            started = anyio.current_time()
            # Each page polls once a second: wait until they asked 150 times together.
            await wait_until(lambda: dashboard.live_served - served_before >= 150, deadline=120)
            elapsed = anyio.current_time() - started
            refreshes = dashboard.snapshot.refreshes - refreshes_before
            total_refreshes = dashboard.snapshot.refreshes
            # Every fragment and page the fifty tabs were served, since the first page load.
            served = dashboard.live_served + len(pages) + 1
            await context.close()
            total_elapsed = anyio.current_time() - opened
    finally:
        await pool.close()
    # One reading per refresh period, not per page: ~150 fragments from a handful of readings,
    # and over the whole test (however slowly this machine loaded fifty tabs) one a period.
    assert refreshes <= elapsed / dashboard.snapshot.period + 2, (refreshes, elapsed)
    assert total_refreshes <= total_elapsed / dashboard.snapshot.period + 2
    await wait_until(lambda: not backends_named(database_url, name))
    spent = committed_transactions(database_url) - before
    # Each reading is at most 8 statements (autocommit: one transaction each), the census one
    # more transaction; the pool's own checks and this test's readings add a few.
    assert spent <= total_refreshes * 9 + 30, (spent, total_refreshes)
    # Without the shared snapshot each page and fragment served would cost a reading; with it,
    # the readings follow the clock: several fragments per reading however slow the machine.
    assert total_refreshes * 2 < served, (total_refreshes, served)


def committed_transactions(conninfo: str) -> int:
    rows = query_blocking(
        conninfo,
        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
        " WHERE datname = current_database()",
    )
    return int(rows[0][0])


def backends_named(conninfo: str, name: str) -> bool:
    rows = query_blocking(
        conninfo, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
    )
    return bool(rows[0][0])


def started_items(conninfo: str, store: str) -> set[int]:
    rows = query_blocking(
        conninfo,
        "SELECT id FROM job_items WHERE instance_id = %s AND status <> 'PENDING'",
        (store,),
    )
    return {int(row[0]) for row in rows}


def processing(conninfo: str, store: str) -> int:
    rows = query_blocking(
        conninfo,
        "SELECT count(*) FROM job_items WHERE instance_id = %s AND status = 'PROCESSING'",
        (store,),
    )
    return int(rows[0][0])


async def test_the_pause_button_pauses_a_store(database_url: str, chromium_path: str) -> None:
    async with run_stub(StubConfig(latency=0.5)) as stub:
        settings = make_settings(
            stub.base_url, api_token=TOKEN, worker_concurrency=2, lease_seconds=2
        )
        # Enough work that the store is still busy when the button is clicked, however slowly.
        await insert_job(database_url, "store-pause", 400)
        async with (
            running_worker(database_url, settings) as worker,
            dashboard_server(worker.pool, settings, worker) as (base, _),
            chromium(chromium_path) as browser,
        ):
            page = await browser.new_page()
            page.on("dialog", lambda dialog: dialog.accept())  # the confirmation: yes
            await sign_in(page, base)
            row = page.locator("tr[data-store='store-pause']")
            await row.get_by_role("button", name="Pause").click(timeout=WAIT_MS)
            await expect(page.get_by_role("status")).to_have_text("store store-pause paused")
            paused = await query(
                database_url, "SELECT paused FROM stores WHERE instance_id = 'store-pause'"
            )
            assert paused == [(True,)]
            await expect(row.locator("td.why")).to_contain_text(
                "paused: `listener store resume store-pause`", timeout=WAIT_MS
            )
            await expect(row.get_by_role("button", name="Resume")).to_be_visible()

            # What was in flight at the pause finishes; after that nothing of it starts, while
            # another store's job runs from start to end.
            await wait_until(lambda: processing(database_url, "store-pause") == 0)
            started = started_items(database_url, "store-pause")
            assert len(started) < 400
            other = await insert_job(database_url, "store-other", 6)

            async def other_completed() -> bool:
                rows = await query(database_url, "SELECT status FROM jobs WHERE id = %s", (other,))
                return rows == [("COMPLETED",)]

            await wait_until(other_completed)
            assert started_items(database_url, "store-pause") == started


async def test_why_waiting_for_a_capped_store(database_url: str, chromium_path: str) -> None:
    async with run_stub(StubConfig(latency=2.0)) as stub:
        settings = make_settings(stub.base_url, api_token=TOKEN, worker_concurrency=4)
        await query(
            database_url,
            "INSERT INTO stores (instance_id, max_in_flight) VALUES ('store-capped', 1)"
            " RETURNING instance_id",
        )
        # A minute of work at one item at a time: still busy when the page looks, however slowly.
        await insert_job(database_url, "store-capped", 30)
        async with (
            running_worker(database_url, settings) as worker,
            dashboard_server(worker.pool, settings, worker) as (base, _),
            chromium(chromium_path) as browser,
        ):
            page = await browser.new_page()
            await sign_in(page, base)
            row = page.locator("tr[data-store='store-capped']")
            await expect(row.locator("td.why")).to_contain_text(
                "at its cap: 1 of at most 1 item(s) in flight", timeout=WAIT_MS
            )
            await expect(row).to_contain_text("≤1 in flight")
            await expect(row.locator("td.why")).to_contain_text(
                f"1 item(s) held by worker {worker_name()}"
            )


def worker_name() -> str:
    """How the page names a worker of this process: its host and pid."""
    return f"{socket.gethostname()} pid {os.getpid()}"
