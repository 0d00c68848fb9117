"""The flex tier (issue 27, part 3), through the real stub and the real `openai` client: a flex
item's requests carry `service_tier="flex"`; "resource unavailable" defers the item (its attempt
given back, each try taking a budget slot) and, once FLEX_FALLBACK_SECONDS have passed since its
first flex attempt, its request goes out on the standard tier; a rate-limit 429 keeps the
budget's handling; `served_tier` records what served it."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from listener import enqueue
from listener.handler import Item
from listener.openai.flex import FlexPolicy
from listener.stub.server import StubConfig, run_stub
from listener.stub.text import FLEX_UNAVAILABLE_MARKER
from tests.support import insert_job, make_settings, query, running_worker, wait_until

pytestmark = pytest.mark.anyio


def product(name: str) -> list[dict[str, Any]]:
    return [{"id": "p1", "name": name, "description": "Stoneware."}]


async def item_of(conninfo: str, job_id: int) -> dict[str, Any]:
    rows = await query(
        conninfo,
        "SELECT status, served_tier, attempts, deferred_since, claimed_at, completed_at, usage,"
        " error FROM job_items WHERE job_id = %s",
        (job_id,),
    )
    names = ("status", "served_tier", "attempts", "deferred_since", "claimed_at", "completed_at")
    return dict(zip((*names, "usage", "error"), rows[0], strict=True))


async def completed(conninfo: str, job_id: int) -> bool:
    return (await item_of(conninfo, job_id))["status"] == "COMPLETED"


async def test_a_flex_item_is_answered_on_flex_and_recorded_so(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url)
        async with running_worker(database_url, settings):
            flex = enqueue(database_url, "store-flex", product("Blue Mug"), tier="flex")
            plain = enqueue(database_url, "store-plain", product("Red Bowl"))
            await wait_until(lambda: completed(database_url, flex))
            await wait_until(lambda: completed(database_url, plain))
        assert stub.state.stats()["flex_total"] == 1  # the realtime item asked for no flex
    item = await item_of(database_url, flex)
    assert (item["served_tier"], item["attempts"], item["deferred_since"]) == ("flex", 1, None)
    assert item["usage"]["prompt_tokens"] > 0
    assert (await item_of(database_url, plain))["served_tier"] == "realtime"


async def test_unavailable_is_retried_on_flex_then_answered_by_flex(database_url: str) -> None:
    async with run_stub(StubConfig(flex_unavailable_rate=1.0)) as stub:
        # A budget: every try takes its slot of the shared per-minute budget.
        settings = make_settings(
            stub.base_url, rate_limit_rpm=600, flex_fallback_seconds=60, worker_concurrency=1
        )
        async with running_worker(database_url, settings) as worker:
            job = enqueue(database_url, "store-flex", product("Blue Mug"), tier="flex")

            async def refused_twice() -> bool:
                return bool(stub.state.stats()["flex_unavailable_total"] >= 2)

            await wait_until(refused_twice)
            waiting = await item_of(database_url, job)
            assert waiting["status"] in ("PENDING", "PROCESSING")
            assert waiting["deferred_since"] is not None
            stub.state.config.flex_unavailable_rate = 0.0  # capacity again
            await wait_until(lambda: completed(database_url, job))
            stats = stub.state.stats()
            # Every try, refused or answered, was a claim of its own, made with a slot of the
            # budget (a worker takes its slot before its item).
            assert worker.stats()["claimedItems"] == stats["requests_total"]
            assert worker.stats()["requestsInLastMinute"] >= stats["requests_total"]
    item = await item_of(database_url, job)
    assert item["served_tier"] == "flex"
    assert item["attempts"] == 1  # deferrals give their attempt back
    assert stats["flex_total"] == stats["flex_unavailable_total"] + 1
    assert worker.stats()["rateLimitedTotal"] == 0  # not a rate limit: the budget never paused


async def test_unavailable_falls_back_to_the_standard_tier_after_the_wait(
    database_url: str,
) -> None:
    fallback = 1.5
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, flex_fallback_seconds=fallback)
        async with running_worker(database_url, settings):
            # The marker: flex never has capacity for this item; the standard tier answers it.
            job = enqueue(
                database_url, "store-flex", product(f"Mug {FLEX_UNAVAILABLE_MARKER}"), tier="flex"
            )
            await wait_until(lambda: completed(database_url, job))
        stats = stub.state.stats()
    item = await item_of(database_url, job)
    assert item["served_tier"] == "realtime"
    assert item["attempts"] == 1
    assert stats["flex_unavailable_total"] >= 1
    assert stats["flex_total"] == stats["flex_unavailable_total"]  # the last try was standard
    # Measured from the first flex attempt: the fallback came no sooner than the wait.
    since = item["deferred_since"]
    assert since is not None
    assert item["claimed_at"] - since >= timedelta(seconds=fallback)


async def test_a_rate_limit_on_flex_keeps_the_budget_s_handling(database_url: str) -> None:
    async with run_stub(StubConfig(fail_next_status=[429])) as stub:
        settings = make_settings(stub.base_url)
        async with running_worker(database_url, settings) as worker:
            job = enqueue(database_url, "store-flex", product("Blue Mug"), tier="flex")
            await wait_until(lambda: completed(database_url, job))
            assert worker.stats()["rateLimitedTotal"] == 1  # the budget paused, as ever
    item = await item_of(database_url, job)
    assert (item["served_tier"], item["deferred_since"]) == ("flex", None)


def test_the_deferral_grows_with_the_wait_and_never_passes_the_fallback() -> None:
    policy = FlexPolicy(fallback_seconds=100.0, timeout_seconds=900.0, rng=random.Random(1))
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def item(waited: float | None) -> Item:
        since = None if waited is None else now - timedelta(seconds=waited)
        return Item(1, 1, "s", "k", None, {}, {}, 1, 3, tier="flex", deferred_since=since)

    assert 0.8 <= policy.deferral(item(None), now).after <= 1.2
    assert 16 <= policy.deferral(item(40), now).after <= 24
    assert policy.deferral(item(99), now).after <= 1.0  # the fallback's moment, not later
    assert policy.use_flex(item(99), now)
    assert not policy.use_flex(item(100), now)  # waited long enough: the standard tier
    realtime = Item(1, 1, "s", "k", None, {}, {}, 1, 3)
    assert not policy.use_flex(realtime, now)


async def test_an_operators_retry_starts_the_flex_wait_afresh(database_url: str) -> None:
    """A FAILED flex item retried by `listener job retry` tries flex again: its deferral clock
    (deferred_since) does not carry over, or the retry would go straight to the standard tier."""
    job_id = await insert_job(database_url, "store-F", 1)
    await query(
        database_url,
        "UPDATE job_items SET status = 'FAILED', error = 'gave up', attempts = 3,"
        " completed_at = now(), deferred_since = now() - interval '1 hour' RETURNING id",
    )
    await query(database_url, "SELECT listener_retry_job(%s)", (job_id,))
    rows = await query(database_url, "SELECT status, attempts, deferred_since FROM job_items")
    assert rows == [("PENDING", 0, None)]
