"""The dashboard's parts without a browser: the pure ones with an injected clock (why waiting,
throughput, sessions, paging), and the HTTP ones over real HTTP against the real PostgreSQL
(sign-in, CSRF, the shared snapshot, the actions)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import anyio
import httpx
import pytest
from pydantic import SecretStr

from listener.db import open_pool
from listener.http import app as http
from listener.http.dashboard import Dashboard
from listener.http.figures import Census, Features, Stores, assemble
from listener.http.serve import serving
from listener.http.session import MAX_AGE_SECONDS, Sessions, same_origin
from listener.http.view import PAGE_SIZE, chart_bars, progress_segments, store_page
from listener.http.waiting import Hold, Policy, Situation, holds_in_words, waiting_reasons
from listener.throughput import MINUTES, Throughput
from tests.support import (
    insert_job,
    make_settings,
    query,
    wait_until,
)

NOW = datetime(2026, 12, 1, 0, 30, tzinfo=UTC)
TOKEN = "dashboard-test-token-0123456789"


def situation(**changes: Any) -> Situation:
    values: dict[str, Any] = {
        "now": NOW,
        "live_workers": 1,
        "budget_paused_until": None,
        "ready_stores": 1,
        "worker_names": {"w1": "host-a pid 12"},
    }
    values.update(changes)
    return Situation(**values)


def reasons(
    where: Situation | None = None, *, policy: Policy | None = None, **facts: Any
) -> list[str]:
    values: dict[str, Any] = {
        "pending": 5,
        "ready": 5,
        "backoff_until": None,
        "in_flight": 0,
        "policy": policy or Policy(),
        "instance_id": "store-x",
    }
    values.update(facts)
    return waiting_reasons(where or situation(), **values)


# -- why waiting ---------------------------------------------------------------------------


def test_nothing_waits_without_pending_items() -> None:
    assert reasons(pending=0, ready=0) == []


def test_a_store_alone_is_next_in_line_and_others_make_it_wait_its_turn() -> None:
    assert reasons() == ["next in line: the next free budget slot is its"]
    assert reasons(situation(ready_stores=4)) == [
        "waiting its turn: 3 other store(s) with ready work share the budget round robin"
    ]


def test_no_live_worker_comes_first() -> None:
    said = reasons(situation(live_workers=0), policy=Policy(paused=True))
    assert said[0] == "no live worker: no process sent a heartbeat in the last 15 s"
    assert said[1].startswith("paused:")


def test_a_paused_store_says_how_to_resume() -> None:
    assert reasons(policy=Policy(paused=True)) == [
        "paused: `listener store resume store-x` or Resume lets it go on"
    ]


def test_a_429_pause_says_until_when() -> None:
    said = reasons(situation(budget_paused_until=NOW + timedelta(seconds=12)))
    assert said == ["the shared budget is paused by a 429 from OpenAI until 00:30:12 UTC (in 12 s)"]


def test_a_store_at_its_caps() -> None:
    assert reasons(policy=Policy(max_in_flight=2), in_flight=2) == [
        "at its cap: 2 of at most 2 item(s) in flight; the next starts when one finishes"
    ]
    assert reasons(policy=Policy(max_in_flight=3), in_flight=2) == [
        "next in line: the next free budget slot is its"
    ]
    over = Policy(rpm_limit=6, rpm_next=NOW + timedelta(seconds=9))
    assert reasons(policy=over) == [
        "over its cap of 6 item(s) a minute until 00:30:09 UTC (in 9 s)"
    ]
    # A GCRA time already passed: the cap allows the next item now.
    assert reasons(policy=Policy(rpm_limit=6, rpm_next=NOW - timedelta(seconds=1)))[0].startswith(
        "next in line"
    )


def test_backoff_only_when_nothing_is_ready() -> None:
    later = NOW + timedelta(minutes=10)
    assert reasons(ready=0, backoff_until=later) == [
        "in backoff after a failed try until 00:40:00 UTC (in 10 min)"
    ]
    assert reasons(ready=2, backoff_until=later) == [
        "next in line: the next free budget slot is its"
    ]


def test_held_items_name_the_worker_and_the_lease() -> None:
    lease = NOW + timedelta(seconds=40)
    holds = [
        Hold(1, 7, "store-x", "w1", lease - timedelta(seconds=5)),
        Hold(2, 7, "store-x", "w1", lease),
        Hold(3, 7, "store-x", "w-gone", NOW - timedelta(seconds=3)),
    ]
    assert holds_in_words(holds, situation()) == [
        "1 item(s) held by worker w-gone, which sends no heartbeat (dead?), "
        "lease ends 00:29:57 UTC (3 s ago)",
        "2 item(s) held by worker host-a pid 12, lease ends 00:30:40 UTC (in 40 s)",
    ]


# -- throughput ----------------------------------------------------------------------------


def test_throughput_counts_by_minute_and_store_and_forgets() -> None:
    meter = Throughput()
    start = 1_000_000_020.0  # 20 s into an epoch minute
    for second in range(0, 120, 2):  # 60 items over two minutes
        meter.record("a" if second % 4 else "b", start + second)
    minutes = meter.per_minute(start + 120)
    assert sum(minutes.values()) == 60
    assert [int(m) for m in minutes] == sorted(int(m) for m in minutes)
    # The last 60 s to a 5 s bucket: the running bucket and the 11 before it, here 55 s
    # (seconds 85 to 139 of the epoch minute's count): 27 items, split between the stores.
    last = meter.by_store(start + 120)
    assert sum(last.values()) == 27
    assert set(last) == {"a", "b"}
    assert meter.last_minute(start + 120) == sum(last.values())
    # Later: the minutes past MINUTES and the buckets past a minute are gone.
    assert meter.by_store(start + 400) == {}
    assert meter.per_minute(start + 60 * (MINUTES + 3)) == {}


def test_chart_and_progress_geometry() -> None:
    bars, scale = chart_bars([0] * 14 + [437], NOW)
    assert scale == 500
    assert bars[-1].height == pytest.approx(120 * 437 / 500)
    assert bars[-1].label == "this minute" and bars[0].label == "14 min ago"
    segments = progress_segments({"PENDING": 1, "COMPLETED": 3, "FAILED": 0})
    assert [(s.status, s.width) for s in segments] == [("COMPLETED", 75.0), ("PENDING", 25.0)]
    assert progress_segments({}) == []


def test_ten_thousand_stores_are_searched_sorted_and_paged() -> None:
    census = Census(rows=[(f"store-{n:05}", 10_000 - n, 1, None, float(n)) for n in range(10_000)])
    stores = Stores(census, census.order, Counter({"store-09999": 3}), Counter(), {}, {}, 10_000)
    first = store_page(stores, "", 1, "backlog")
    assert (first.matching, first.pages, len(first.rows)) == (10_000, 200, PAGE_SIZE)
    assert first.rows[0].instance_id == "store-00000" and first.rows[0].backlog == 10_000
    last = store_page(stores, "", 999, "backlog")  # past the end: the last page
    assert last.page == 200 and last.rows[-1].instance_id == "store-09999"
    found = store_page(stores, "STORE-0999", 1, "store")  # any case, a substring
    assert [s.instance_id for s in found.rows] == [f"store-0999{n}" for n in range(10)]
    assert store_page(stores, "", 1, "in_flight").rows[0].instance_id == "store-09999"
    assert store_page(stores, "", 1, "oldest").rows[0].oldest_age == 9999.0
    assert store_page(stores, "", 1, "nonsense").sort == "backlog"


# -- sessions ------------------------------------------------------------------------------


def test_sessions_are_signed_expire_and_end_with_the_token() -> None:
    now = [1_000_000.0]
    sessions = Sessions(SecretStr(TOKEN), clock=lambda: now[0])
    cookie = sessions.issue()
    nonce = sessions.verify(cookie)
    assert nonce is not None
    assert TOKEN not in cookie
    tampered = cookie[:-1] + ("0" if cookie[-1] != "0" else "1")
    assert sessions.verify(tampered) is None
    assert sessions.verify("a.b") is None and sessions.verify(None) is None
    # Another token (rotated) refuses every session of the old one.
    assert Sessions(SecretStr(TOKEN + "x"), clock=lambda: now[0]).verify(cookie) is None
    assert sessions.csrf_matches(nonce, sessions.csrf_token(nonce))
    assert not sessions.csrf_matches(nonce, sessions.csrf_token("other"))
    assert not sessions.csrf_matches(nonce, None)
    now[0] += MAX_AGE_SECONDS + 1
    assert sessions.verify(cookie) is None


def test_same_origin() -> None:
    own = "http://127.0.0.1:3000"
    assert same_origin(None, None, own)
    assert same_origin(own, "same-origin", own)
    assert not same_origin("https://evil.example", None, own)
    assert not same_origin(own, "cross-site", own)


# -- over HTTP -----------------------------------------------------------------------------


@asynccontextmanager
async def client_of(
    database_url: str, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Dashboard]]:
    settings = make_settings("http://127.0.0.1:9/v1", **overrides)
    pool = await open_pool(database_url, settings, name="dashboard-http-test")
    try:
        app = http.build_app(pool, settings)
        async with (
            serving(app, "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            yield client, app.state.dashboard
    finally:
        await pool.close()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


@pytest.mark.anyio
async def test_sign_in_guards_the_page_and_nothing_else_changes(database_url: str) -> None:
    async with client_of(database_url, api_token=TOKEN) as (client, _):
        page = await client.get("/", headers={"Accept": "text/html"})
        assert (page.status_code, page.headers["location"]) == (303, "/login")
        refused = await client.get("/")  # not a browser: the JSON 401 as before
        assert refused.status_code == 401 and refused.json()["status"] == "error"
        assert (await client.get("/health")).status_code in (200, 503)
        assert (await client.get("/static/dashboard.css")).status_code == 200
        wrong = await client.post("/login", data={"token": "x" * 30})
        assert wrong.status_code == 401 and "wrong token" in wrong.text
        assert "listener_session" not in wrong.headers.get("set-cookie", "")
        # A foreign page's sign-in is refused even with the right token.
        foreign = await client.post(
            "/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        right = await client.post("/login", data={"token": TOKEN})
        assert right.status_code == 303
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = await client.get("/")
        assert page.status_code == 200 and "Fleet" in page.text
        assert TOKEN not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # The cookie opens the dashboard, not the machine endpoints.
        assert (await client.get("/metrics")).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/dashboard/live", headers=bearer)).status_code == 200


@pytest.mark.anyio
async def test_actions_need_the_csrf_token_and_confirm(database_url: str) -> None:
    job_id = await insert_job(database_url, "store-act", 3)
    # No API_TOKEN: a session is handed out; the actions are on only when the setting says so.
    async with client_of(database_url, dashboard_allow_actions_without_token=True) as (client, _):
        page = await client.get("/")
        csrf = csrf_of(page.text)
        form = {"job_id": str(job_id), "confirmed": "yes"}
        assert (await client.post("/dashboard/actions/cancel", data=form)).status_code == 403
        forged = {**form, "csrf": "0" * 64}
        assert (await client.post("/dashboard/actions/cancel", data=forged)).status_code == 403
        cross = await client.post(
            "/dashboard/actions/cancel",
            data={**form, "csrf": csrf},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert cross.status_code == 403
        # Unconfirmed: a confirmation page, nothing done.
        unconfirmed = {**form, "confirmed": "", "csrf": csrf}
        ask = await client.post("/dashboard/actions/cancel", data=unconfirmed)
        assert ask.status_code == 200 and f"Cancel job {job_id}?" in ask.text
        assert await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job_id,)) == [
            ("PENDING",)
        ]
        done = await client.post("/dashboard/actions/cancel", data={**form, "csrf": csrf})
        assert done.status_code == 303
        assert await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job_id,)) == [
            ("CANCELLED",)
        ]
        statuses = await query(
            database_url, "SELECT DISTINCT status FROM job_items WHERE job_id = %s", (job_id,)
        )
        assert statuses == [("CANCELLED",)]
        again = await client.post("/dashboard/actions/cancel", data={**form, "csrf": csrf})
        said = unquote(again.headers["location"])
        assert said == f"/?flash=job {job_id}: nothing to do (it is CANCELLED)"
        missing = {"job_id": "999999", "confirmed": "yes", "csrf": csrf}
        gone = await client.post("/dashboard/actions/cancel", data=missing)
        assert unquote(gone.headers["location"]).endswith("not cancelled: there is no such job")


@pytest.mark.anyio
async def test_pages_asking_at_once_share_one_reading(database_url: str) -> None:
    await insert_job(database_url, "store-shared", 2)
    async with client_of(database_url, api_token=TOKEN) as (client, dashboard):
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        await client.get("/dashboard/live", headers=bearer)
        before = dashboard.snapshot.refreshes
        # Stale: the next caller reads again; and a long period, so that however slow this
        # machine answers fifty requests, one reading stays fresh for all of them.
        dashboard.snapshot.taken = float("-inf")
        dashboard.snapshot.period = 60.0

        async def fetch() -> None:
            response = await client.get("/dashboard/live", headers=bearer)
            assert response.status_code == 200 and "store-shared" in response.text

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(fetch)
        assert dashboard.snapshot.refreshes == before + 1


@pytest.mark.anyio
async def test_retry_pause_and_resume_act_on_the_database(database_url: str) -> None:
    job_id = await insert_job(database_url, "store-retry", 2)
    await query(
        database_url,
        "UPDATE job_items SET status = 'FAILED', error = 'boom', completed_at = now()"
        " WHERE job_id = %s RETURNING id",
        (job_id,),
    )
    await query(
        database_url,
        "UPDATE jobs SET status = 'COMPLETED_WITH_ERRORS', completed_at = now() WHERE id = %s"
        " RETURNING id",
        (job_id,),
    )
    async with client_of(database_url, api_token=TOKEN) as (client, _):
        await client.post("/login", data={"token": TOKEN})
        csrf = csrf_of((await client.get("/")).text)
        assert (
            f'data-confirm="Retry the 2 failed item(s) of job {job_id}?"'
            in (await client.get("/dashboard/live")).text
        )
        retry = {"job_id": str(job_id), "confirmed": "yes", "csrf": csrf}
        done = await client.post("/dashboard/actions/retry", data=retry)
        assert unquote(done.headers["location"]) == f"/?flash=job {job_id} retried"
        assert await query(
            database_url, "SELECT status, attempts FROM job_items WHERE job_id = %s", (job_id,)
        ) == [("PENDING", 0), ("PENDING", 0)]

        store = {"instance_id": "store-retry", "confirmed": "yes", "csrf": csrf}
        await client.post("/dashboard/actions/pause", data=store)
        rows = await query(
            database_url, "SELECT paused FROM stores WHERE instance_id = 'store-retry'"
        )
        assert rows == [(True,)]
        page = (await client.get("/dashboard/live")).text
        assert "paused: `listener store resume store-retry`" in page
        await client.post("/dashboard/actions/resume", data=store)
        rows = await query(
            database_url, "SELECT paused FROM stores WHERE instance_id = 'store-retry'"
        )
        assert rows == [(False,)]


def test_assemble_shares_weights_and_reasons_from_one_reading() -> None:
    minute = int(NOW.timestamp() // 60)
    stats = {
        "inFlight": 1,
        "pool": {"total": 2, "idle": 1, "waiting": 0, "max": 4},
        "rpm": 450,
        "finishedPerMinute": {str(minute): 30, str(minute - 2): 12, "junk": 1},
        "finishedLastMinuteByStore": {"a": 30, "b": 10},
    }
    workers = [("w1", "host-a", 12, NOW, 0.4, True, stats)]
    in_flight = [(1, 10, "a", "w1", NOW, NOW + timedelta(seconds=50))]
    jobs = [(10, "a", "PROCESSING", NOW - timedelta(minutes=2), None, 3, 1, 4, 0, 0, None, 3)]
    census = Census(
        rows=[("a", 3, 3, None, 90.0), ("b", 5, 0, NOW + timedelta(minutes=1), 30.0)],
        latest_jobs={"a": (10, 0.25)},
    )
    policies = {"b": Policy(weight=3), "c": Policy(paused=True)}
    snapshot = assemble(
        (NOW, 2, None),
        workers,
        in_flight,
        jobs,
        policies,
        census,
        Features(stores=True),
        (0, 0),
        0.004,
        1.5,
    )
    assert snapshot.stores.order == ["b", "a", "c"]  # by backlog, then a policy alone
    by_id = {s: snapshot.stores.row(s) for s in snapshot.stores.order}
    assert (by_id["a"].in_flight, by_id["a"].last_minute, by_id["a"].start_latency) == (1, 30, 0.25)
    assert by_id["a"].budget_share == 0.75 and by_id["b"].budget_share == 0.25
    assert by_id["a"].weight_share == 0.25 and by_id["b"].weight_share == 0.75
    assert by_id["c"].weight_share == 0  # paused, no work: a policy row shown, no share
    assert by_id["b"].reasons(snapshot.situation) == [
        "in backoff after a failed try until 00:31:00 UTC (in 1 min)"
    ]
    assert by_id["a"].reasons(snapshot.situation)[-1] == (
        "1 item(s) held by worker host-a pid 12, lease ends 00:30:50 UTC (in 50 s)"
    )
    fleet = snapshot.fleet
    assert fleet.per_minute[-1] == 30 and fleet.per_minute[-3] == 12 and sum(fleet.per_minute) == 42
    assert (fleet.pending, fleet.ready, fleet.in_flight, fleet.stores_with_work) == (8, 3, 1, 2)
    assert (fleet.rpm_limit, fleet.tpm_limit, fleet.rate_limited_total) == (450, 0, 2)
    assert fleet.oldest_pending_age == 90.0
    job = snapshot.jobs[0]
    assert job.duration == 120 and job.total == 8
    assert job.reasons[-1].startswith("1 item(s) held by worker host-a pid 12")


# -- issue 25, defect 10: strict parsing, sign-out, one key for the fleet -------------------


@pytest.mark.anyio
async def test_a_job_id_of_other_digits_is_400_and_touches_nothing(database_url: str) -> None:
    """"²".isdigit() and "١".isdigit() are true: int() raises on the first (a 500) and reads the
    second as 1 (job 1 cancelled). Only ASCII digits are a job id."""
    first = await insert_job(database_url, "store-digits", 2)
    async with client_of(database_url, api_token=TOKEN) as (client, _):
        await client.post("/login", data={"token": TOKEN})
        csrf = csrf_of((await client.get("/")).text)
        arabic_one = "".join(chr(0x0660 + int(d)) for d in str(first))
        for job_id in ("²", arabic_one, "1e3", "-1", " 1 2", "9" * 19):
            form = {"job_id": job_id, "confirmed": "yes", "csrf": csrf}
            response = await client.post("/dashboard/actions/cancel", data=form)
            assert response.status_code == 400, (job_id, response.status_code)
            assert "is not a job id" in response.text
    rows = await query(database_url, "SELECT status FROM jobs WHERE id = %s", (first,))
    assert rows == [("PENDING",)]


@asynccontextmanager
async def two_processes(
    database_url: str, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two apps, each with its own pool and its own memory, as two processes behind one load
    balancer have; a client of each."""
    async with client_of(database_url, **overrides) as (a, _), client_of(
        database_url, **overrides
    ) as (b, _):
        yield a, b


def carry_cookie(source: httpx.AsyncClient, target: httpx.AsyncClient) -> str:
    cookie = source.cookies["listener_session"]
    target.cookies.set("listener_session", cookie)
    return cookie


@pytest.mark.anyio
async def test_sign_out_ends_the_session_in_every_process(database_url: str) -> None:
    job_id = await insert_job(database_url, "store-out", 2)
    async with two_processes(database_url, api_token=TOKEN) as (a, b):
        await a.post("/login", data={"token": TOKEN})
        csrf = csrf_of((await a.get("/")).text)
        cookie = carry_cookie(a, b)
        assert (await b.get("/dashboard/live")).status_code == 200
        assert (await a.post("/logout", data={"csrf": csrf})).status_code == 303
        # The copied cookie is dead: the same process refuses it at once...
        a.cookies.set("listener_session", cookie)
        assert (await a.get("/dashboard/live")).status_code == 401
        # ...and every process refuses it for an action at once, and for a read within a second.
        form = {"job_id": str(job_id), "confirmed": "yes", "csrf": csrf}
        assert (await b.post("/dashboard/actions/cancel", data=form)).status_code == 401

        async def refused() -> bool:
            return (await b.get("/dashboard/live")).status_code == 401

        await wait_until(refused, deadline=10)
    rows = await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job_id,))
    assert rows == [("PENDING",)]


@pytest.mark.anyio
async def test_without_a_token_one_key_signs_for_the_whole_fleet(database_url: str) -> None:
    """No API_TOKEN: the page of one process hands out the session and CSRF token, the action
    lands on another (a load balancer's choice): it must hold there too."""
    job_id = await insert_job(database_url, "store-lb", 2)
    async with two_processes(database_url, dashboard_allow_actions_without_token=True) as (a, b):
        csrf = csrf_of((await a.get("/")).text)
        carry_cookie(a, b)
        form = {"job_id": str(job_id), "confirmed": "yes", "csrf": csrf}
        done = await b.post("/dashboard/actions/cancel", data=form)
        assert done.status_code == 303, done.text
        assert unquote(done.headers["location"]) == f"/?flash=job {job_id} cancelled"
    assert await query(database_url, "SELECT count(*) FROM dashboard_keys") == [(1,)]
