"""OpenAI calls under the shared limiter, against the stub through the real openai client."""

from __future__ import annotations

import signal
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

from listener.handler import Handler, Item
from listener.limiter import Grant
from listener.stub.server import StubConfig, run_stub
from listener.worker import SLOT_SEEKERS, binding_rpm, slot_seekers
from tests.support import (
    RecordingGenerator,
    communicate,
    heard_so_far,
    insert_job,
    make_settings,
    query,
    running_worker,
    spawn_worker,
    starts_at_arrival,
    wait_for_counts,
    wait_until,
    workers_are_ready,
)

pytestmark = pytest.mark.anyio


async def test_items_complete_with_the_stub_s_text_and_usage(database_url: str) -> None:
    async with run_stub(StubConfig(latency=0.01)) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=6000, rate_limit_tpm=10_000_000)
        async with running_worker(database_url, settings):
            await insert_job(
                database_url,
                "store-E",
                3,
                payload=lambda n: {"name": f"Teapot {n}", "attributes": {"color": "blue"}},
            )
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 3})
        assert stub.state.completed_total == 3
    rows = await query(
        database_url,
        "SELECT product_id, result, completed_at IS NOT NULL FROM job_items ORDER BY id",
    )
    for product_id, result, has_completed_at in rows:
        assert has_completed_at
        assert f"Teapot {product_id[1:]}" in result["text"]
        usage = result["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    limiter = await query(database_url, "SELECT count(*) FROM rate_limiters WHERE name = 'openai'")
    assert limiter == [(1,)]  # the budget went through the shared row


class TimedGenerator(RecordingGenerator):
    """Records when each call started and when each 429 came back."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.call_times: list[float] = []
        self.limited_at: list[float] = []

    async def call(self, handler: Handler, item: Item) -> Any:
        self.call_times.append(anyio.current_time())
        try:
            return await handler(item)
        except Exception:
            self.limited_at.append(anyio.current_time())
            raise


async def test_a_429_pauses_the_whole_limiter_and_fails_no_item(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=6000, worker_concurrency=4)
        handler = TimedGenerator(settings)
        async with running_worker(database_url, settings, handler) as worker:
            limiter = worker.limiter
            acquire, pause = limiter.acquire, limiter.pause
            slots: list[tuple[float, float]] = []  # (asked, granted)
            paused: list[float] = []  # when each pause was in force

            async def timed_acquire(estimated_tokens: int) -> Grant:
                asked = anyio.current_time()
                grant = await acquire(estimated_tokens)
                slots.append((asked, anyio.current_time()))
                return grant

            async def timed_pause(seconds: float, *, rate_limited: bool) -> None:
                await pause(seconds, rate_limited=rate_limited)
                paused.append(anyio.current_time())

            limiter.acquire, limiter.pause = timed_acquire, timed_pause  # type: ignore[method-assign]
            stub.state.config.fail_next_status.extend([429, 429])  # each says retry-after: 1
            await insert_job(database_url, "store-429", 12)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 12})
            assert worker.counters.rate_limited == 2
    assert await query(database_url, "SELECT max(attempts) FROM job_items") == [(1,)]
    ((limited_total,),) = await query(database_url, "SELECT rate_limited_total FROM rate_limiters")
    assert limited_total == 2
    # Every slot asked for once the pause was in force, whichever worker asked, came no sooner
    # than the 429's retry-after (a slot granted before it cannot be recalled).
    last_429, in_force = max(handler.limited_at), max(paused)
    later = [granted for asked, granted in slots if asked >= in_force]
    assert later
    assert min(later) - last_429 >= 0.95


async def test_two_processes_share_one_budget_without_a_429(database_url: str) -> None:
    # The stub allows 20 requests per 5 s (240 a minute); so does each worker's setting.
    # Two processes with a limiter each of their own would send twice that and get 429s.
    # A 15 % headroom spaces 21 requests 0.9 s wider than the window: the margin for the
    # jitter between the database's clock, the processes and the stub (which stamps a request
    # when its event loop gets to it) on a machine loaded well past its cores. Unshared, the
    # budget would be exceeded twofold whatever the margin. (The default 1 % is measured at
    # 450 RPM in bench/budget.py.)
    async with run_stub(StubConfig(rpm=20, window_seconds=5, latency=0.05)) as stub:
        env = {
            "RATE_LIMIT_RPM": "240",
            "RATE_LIMIT_HEADROOM_PERCENT": "15",
            "WORKER_CONCURRENCY": "4",
        }
        procs = [spawn_worker(database_url, stub.base_url, **env) for _ in range(2)]
        try:
            await wait_until(lambda: workers_are_ready(database_url, procs))
            for store in ("a", "b", "c", "d"):
                await insert_job(database_url, f"store-{store}", 12)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 48, deadline=60)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            outputs = [await communicate(proc, 30) for proc in procs]
        stats = stub.state.stats()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert stats["rate_limited_total"] == 0, stats
    assert stats["max_requests_in_any_window"] <= 20, stats
    by_worker = dict(
        await query(database_url, "SELECT claimed_by, count(*) FROM job_items GROUP BY 1")
    )
    assert len(by_worker) == 2, by_worker


def test_slot_seekers_cover_50_ms_of_the_budget_and_never_fewer_than_two() -> None:
    assert slot_seekers(450, 16) == SLOT_SEEKERS == 2  # 133 ms apart: two keep it busy
    assert slot_seekers(600, 64) == 2
    assert slot_seekers(0, 16) == 2  # no budget: acquire returns at once anyway
    assert slot_seekers(30_000, 64) == 25  # 2 ms apart: 50 ms of slots
    assert slot_seekers(30_000, 16) == 16  # as many as there are workers
    assert slot_seekers(240_000, 1_000) == 200


def test_a_token_budget_alone_sets_the_pace_of_the_seekers_too() -> None:
    assert binding_rpm(450, 0, 1_250) == 450
    assert binding_rpm(0, 0, 1_250) == 0  # no budget
    # 150,000,000 tokens a minute at 1,250 a request: 120,000 requests, slots 0.5 ms apart.
    assert binding_rpm(0, 150_000_000, 1_250) == 120_000
    assert slot_seekers(binding_rpm(0, 150_000_000, 1_250), 64) == 64
    assert binding_rpm(30_000, 150_000_000, 1_250) == 30_000  # the lower of the two binds
    assert binding_rpm(30_000, 2_000_000, 1_250) == 1_600
    assert binding_rpm(0, 100, 1_250) == 1  # never 0 while a budget is set


@pytest.mark.parametrize(("rpm", "concurrency"), [(600, 16), (30_000, 64)])
async def test_idle_workers_do_not_spend_the_budget_ahead(
    database_url: str, rpm: int, concurrency: int
) -> None:
    # Idle workers and one item: a slot reserved per idle worker would push the next store's
    # first request `concurrency` intervals into the future (at 30,000 RPM, 128 ms).
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=rpm, worker_concurrency=concurrency)
        async with running_worker(database_url, settings):
            await insert_job(database_url, "store-one", 1)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 1})
            ((ahead,),) = await query(
                database_url,
                "SELECT extract(epoch FROM request_tat - clock_timestamp()) FROM rate_limiters",
            )
    # At most the seekers' slots plus the one being used: a bound that does not grow with
    # WORKER_CONCURRENCY (2 seekers at 600 RPM, 50 ms of slots at 30,000).
    interval = 60 / (rpm * 0.99)
    assert float(ahead) <= (slot_seekers(rpm, concurrency) + 1) * interval


async def test_at_a_big_budget_a_new_store_still_gets_the_next_claim(database_url: str) -> None:
    # 30,000 RPM: 16 seekers hold slots at once and wake by 10 ms ticks. The store is still
    # chosen when the slot comes, not when it was reserved: a store that arrives behind a
    # backlog starts before anything claimed after the worker heard of it.
    async with run_stub(StubConfig(latency=0.0)) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=30_000, worker_concurrency=16)
        handler = RecordingGenerator(settings)
        async with running_worker(database_url, settings, handler) as worker:
            arrived = starts_at_arrival(worker, handler, "store-new")
            await insert_job(database_url, "store-old", 2_000)
            await wait_until(lambda: len(handler.starts) >= 100)
            await insert_job(database_url, "store-new", 3)
            await wait_until(lambda: any(i.store == "store-new" for i in handler.starts))
            after = [item.store for item in handler.starts[arrived[0] :]]
    # Only items claimed before the notification reached the worker (at most one each of its
    # workers), and one of the claim that brings the new store's, start before its first.
    assert after.index("store-new") <= settings.worker_concurrency, after[:20]


async def _served(listener: psycopg.Connection[Any], conninfo: str) -> list[str]:
    """Every `stores_served` payload committed so far."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return await anyio.to_thread.run_sync(heard_so_far, listener, conn, "stores_served")


async def test_a_lone_worker_announces_no_claim_and_a_fleet_announces_every_one(
    database_url: str,
) -> None:
    # `stores_served` keeps a fleet's rings in step; each one costs every listening session a
    # transaction, so a process alone under a budget sends none.
    # A blocking session: heard_so_far reads it on a thread, as test_claim's do.
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN stores_served")
        async with run_stub(StubConfig()) as stub:
            settings = make_settings(stub.base_url, rate_limit_rpm=6000)
            async with running_worker(database_url, settings) as first:
                await wait_until(lambda: first.dispatcher._others == 0)  # its first beat: alone
                await insert_job(database_url, "store-a", 5)
                await wait_for_counts(database_url, lambda counts: counts.get("COMPLETED") == 5)
                assert first.dispatcher.claims > 0
                assert await _served(listener, database_url) == []

                async with running_worker(database_url, settings) as second:
                    # The newcomer's first beat finds the first worker; the first learns of the
                    # newcomer from that one's announcements or its own next beat.
                    await wait_until(lambda: second.dispatcher._others == 1)
                    await wait_until(lambda: first.dispatcher._announcing())
                    claims = first.dispatcher.claims + second.dispatcher.claims
                    await insert_job(database_url, "store-b", 20)
                    await wait_for_counts(
                        database_url, lambda counts: counts.get("COMPLETED") == 25
                    )
                    claims = first.dispatcher.claims + second.dispatcher.claims - claims
            served = await _served(listener, database_url)
    senders = {payload.split("\x1f")[0] for payload in served}
    assert senders <= {first.worker_id, second.worker_id}
    # Every claim that got an item announced it (the empty ones have nothing to tell).
    assert sum(int(payload.split("\x1f")[2]) for payload in served) == 20
    assert len(served) <= claims
