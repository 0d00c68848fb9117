"""The rate limiter: the pure GCRA core on a simulated clock, then the async limiters.

The bounds are checked on the slots handed out (simulated, or the database's own clock), never
on elapsed wall time, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import accumulate, pairwise
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from psycopg_pool import AsyncConnectionPool

from listener.errors import DatabaseError
from listener.limiter import (
    Grant,
    LocalLimiter,
    PostgresLimiter,
    make_limiter,
)
from listener.limiter.gcra import (
    MINUTE,
    GcraState,
    fire_at,
    pause,
    plan_batch,
    request_interval,
    reserve,
    settle,
    slots_within,
    to_micros,
    token_interval,
)
from listener.limiter.queue import MAX_PAUSE_SECONDS, START_TICK_US
from listener.settings import Settings
from tests.support import (
    query,
)

SECOND = 1_000_000

# --- the pure core -------------------------------------------------------------------------


def simulate(
    rpm: int,
    tpm: int,
    *,
    workers: int,
    minutes: int = 10,
    tokens: tuple[int, int] = (0, 0),
    call: tuple[float, float] = (0.2, 3.0),
    seed: int = 1,
    tick: int = 0,
) -> list[tuple[int, int]]:
    """Workers that reserve the moment they are free, sleep to their slot (rounded up to the
    grid of `tick`, as the limiter's waiters do), then make a call.

    Returns (start, tokens) of every grant whose slot falls in the simulated minutes.
    """
    rng = random.Random(seed)
    state = GcraState()
    end = minutes * MINUTE
    free_at = [(0, worker) for worker in range(workers)]
    grants: list[tuple[int, int]] = []
    while free_at:
        now, worker = heapq.heappop(free_at)
        estimate = rng.randint(*tokens)
        [slot], state = reserve(state, now, [estimate], rpm, tpm)
        if slot >= end:
            continue
        start = fire_at(slot, tick)
        grants.append((start, estimate))
        heapq.heappush(free_at, (start + to_micros(rng.uniform(*call)), worker))
    return grants


def windows(grants: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """For every half-open minute [slot_i, slot_i + 60 s): (grants, tokens, last grant's tokens).

    A window holding the most grants (or tokens) can always slide right until it starts at a
    grant, so these windows cover the worst case of every window.
    """
    slots = [slot for slot, _ in grants]
    assert slots == sorted(slots)
    prefix = [0, *accumulate(t for _, t in grants)]
    found = []
    end = 0
    for i, slot in enumerate(slots):
        end = max(end, i)
        while end < len(slots) and slots[end] < slot + MINUTE:
            end += 1
        found.append((end - i, prefix[end] - prefix[i], grants[end - 1][1]))
    return found


def test_intervals_are_whole_microseconds_rounded_up() -> None:
    assert request_interval(600) == 100_000
    assert request_interval(450) == 133_334  # 133_333.3 rounded up: never faster than asked
    assert request_interval(0) == 0
    assert token_interval(1, 7) == 8_571_429
    assert token_interval(-1, 7) == -8_571_428  # a refund rounds towards zero
    assert token_interval(500, 0) == 0
    with pytest.raises(ValueError, match="rpm"):
        request_interval(-1)


@pytest.mark.parametrize(("rpm", "workers"), [(7, 2), (450, 64), (600, 64), (3_000, 300)])
def test_never_more_than_rpm_in_any_minute_and_saturated(rpm: int, workers: int) -> None:
    grants = simulate(rpm, 0, workers=workers)
    assert max(count for count, _, _ in windows(grants)) == rpm
    # Ten simulated minutes of saturation: at least 98 % of the budget is granted.
    assert len(grants) >= 0.98 * rpm * 10


@pytest.mark.parametrize("rpm", [0, 450])
def test_tpm_bound_and_saturation(rpm: int) -> None:
    tpm = 40_000
    grants = simulate(rpm, tpm, workers=32, tokens=(1, 3_000))
    for count, tokens, last in windows(grants):
        # The exact bound: every grant but the window's last fits in under a minute of tpm.
        assert tokens - last <= tpm - 1
        assert count <= rpm or rpm == 0
    assert sum(t for _, t in grants) >= 0.98 * tpm * 10


@pytest.mark.parametrize(("rpm", "tick"), [(30_000, 10_000), (60_000, 10_000), (7_000, 60_000)])
def test_starting_a_tick_s_slots_together_keeps_the_bound(rpm: int, tick: int) -> None:
    # Workers start at their slot rounded up to the tick's grid, several at one instant: still
    # never more than rpm in any minute, and the budget still used.
    grants = simulate(rpm, 0, workers=rpm // 60, minutes=3, call=(0.0, 0.3), tick=tick)
    starts = Counter(start for start, _ in grants)
    assert all(start % tick == 0 for start in starts)
    assert max(starts.values()) > 1  # together, indeed
    assert max(count for count, _, _ in windows(grants)) <= rpm
    assert len(grants) >= 0.98 * rpm * 3


def test_a_tick_s_tpm_bound_holds_too() -> None:
    tpm = 3_000_000
    grants = simulate(30_000, tpm, workers=600, minutes=3, tokens=(1, 300), tick=10_000)
    for count, tokens, last in windows(grants):
        assert tokens - last <= tpm - 1
        assert count <= 30_000


def test_fire_at_rounds_up_to_a_grid_that_divides_the_minute() -> None:
    assert [fire_at(slot, 10_000) for slot in (0, 1, 9_999, 10_000, 10_001)] == [
        0,
        10_000,
        10_000,
        10_000,
        20_000,
    ]
    assert fire_at(12_345, 0) == fire_at(12_345, 1) == 12_345  # no grid: the slot itself
    with pytest.raises(ValueError, match="divides the minute"):
        fire_at(0, 7_000)  # 60 s is not a whole number of 7 ms ticks: the bound would break
    with pytest.raises(ValueError):
        fire_at(0, -10_000)


def test_slots_within_a_span() -> None:
    assert slots_within(30_000, 50_000) == 25  # 2 ms apart
    assert slots_within(450, 50_000) == 1  # 133 ms apart: the span holds one slot at most
    assert slots_within(0, 50_000) == 0  # no budget
    assert slots_within(240_000, 50_000) == 200


def test_slots_are_fifo_and_a_batch_equals_one_by_one() -> None:
    rng = random.Random(7)
    state = one_by_one = GcraState()
    now = 0
    previous = -1
    for _ in range(500):
        now += rng.randint(0, 200_000)
        tokens = [rng.randint(0, 2_000) for _ in range(rng.randint(1, 6))]
        slots, state = reserve(state, now, tokens, 450, 90_000)
        singles = []
        for estimate in tokens:
            [slot], one_by_one = reserve(one_by_one, now, [estimate], 450, 90_000)
            singles.append(slot)
        assert slots == singles
        assert state == one_by_one
        assert slots[0] > previous
        assert slots == sorted(set(slots))
        previous = slots[-1]


def test_batch_plan_offsets() -> None:
    plan = plan_batch([60, 0, 10], rpm=600, tpm=600)
    # 60 tokens at 600 tpm take 6 s; then the request step (0.1 s) binds; then 1 s of tokens.
    assert plan.offsets == (0, 6 * SECOND, 6 * SECOND + 100_000)
    assert plan.request_advance == 6 * SECOND + 200_000
    assert plan.token_advance == 7 * SECOND + 100_000
    with pytest.raises(ValueError):
        plan_batch([], 600, 600)
    with pytest.raises(ValueError):
        plan_batch([-1], 600, 600)


def test_pause_pushes_every_later_slot_past_its_end_without_burst() -> None:
    state = GcraState()
    for now in range(0, 10 * SECOND, SECOND):
        _, state = reserve(state, now, [100], 600, 0)
    state = pause(state, 10 * SECOND, 20 * SECOND, rate_limited=True)
    assert state.paused_until == 30 * SECOND
    assert state.rate_limited_total == 1
    # A shorter pause later never shortens it; a budget pause is not a 429.
    state = pause(state, 11 * SECOND, SECOND, rate_limited=False)
    assert state.paused_until == 30 * SECOND
    assert state.rate_limited_total == 1
    slots, _ = reserve(state, 12 * SECOND, [100] * 5, 600, 0)
    assert slots == [30 * SECOND + i * 100_000 for i in range(5)]
    with pytest.raises(ValueError):
        pause(state, 0, -1, rate_limited=False)


def test_settle_moves_the_token_budget_but_never_before_now() -> None:
    tpm = 6_000  # 100 tokens a second
    [slot], state = reserve(GcraState(), 0, [100], 0, tpm)
    assert (slot, state.token_tat) == (0, SECOND)
    assert settle(state, 0, 50, tpm).token_tat == SECOND + SECOND // 2
    assert settle(state, 0, -50, tpm).token_tat == SECOND // 2
    assert settle(state, SECOND // 4, -100, tpm).token_tat == SECOND // 4  # clamped at now
    assert settle(state, 0, 500, 0) == state  # no token budget: nothing to correct
    [after], _ = reserve(settle(state, 0, 200, tpm), 0, [1], 0, tpm)
    assert after == 3 * SECOND


def test_settled_before_the_next_reservation_bounds_actual_tokens() -> None:
    rng = random.Random(3)
    tpm = 30_000
    state = GcraState()
    now = 0
    grants = []
    for _ in range(2_000):
        [slot], state = reserve(state, now, [1_000], 0, tpm)
        actual = rng.randint(0, 4_000)  # estimates off either way
        now = slot + rng.randint(0, 2 * SECOND)
        state = settle(state, now, actual - 1_000, tpm)
        grants.append((slot, actual))
    for _, tokens, last in windows(grants):
        assert tokens - last <= tpm - 1


def test_no_budget_grants_at_once() -> None:
    slots, state = reserve(GcraState(), 5, [10, 20, 30], 0, 0)
    assert slots == [5, 5, 5]
    assert reserve(state, 9, [1], 0, 0)[0] == [9]


# --- the async limiters ----------------------------------------------------------------------


async def acquire_in_order(limiter: Any, count: int, tokens: int = 0) -> list[Grant]:
    """`count` concurrent acquires, entered in index order; their grants by index."""
    grants: dict[int, Grant] = {}

    async def one(index: int) -> None:
        grants[index] = await limiter.acquire(tokens)

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)
    return [grants[i] for i in range(count)]


def assert_spaced(slots: Sequence[int], interval: int) -> None:
    assert all(b - a >= interval for a, b in pairwise(slots)), slots


@pytest.mark.anyio
async def test_local_limiter_is_fifo_and_spaced() -> None:
    limiter = LocalLimiter(rpm=60_000, tpm=0)  # a slot every millisecond
    grants = await acquire_in_order(limiter, 20, tokens=10)
    assert_spaced([g.slot_us for g in grants], 1_000)
    snapshot = limiter.snapshot()
    assert snapshot.waiters == 0
    assert (snapshot.requests_last_minute, snapshot.tokens_last_minute) == (20, 200)
    assert snapshot.rpm == 60_000


@pytest.mark.anyio
async def test_waiters_whose_slots_share_a_tick_start_together() -> None:
    # 60,000 RPM: slots 1 ms apart, so a process starts them by 10 ms ticks. The clock stands
    # still at 0: the slots are 0, 1, ..., 19 ms and the ticks end at 0, 10 and 20 ms.
    limiter = LocalLimiter(rpm=60_000, tpm=0, clock=lambda: 0.0)
    assert limiter.start_tick == START_TICK_US == 10_000
    deadlines: dict[int, float] = {}

    async def one() -> None:
        await limiter.acquire(0)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
        while len(deadlines) < 20:  # white-box: each ticket's deadline once it has its slot
            deadlines.update((t.slot_us, t.deadline) for t in limiter._sleeping if t.slot_us)
            await anyio.lowlevel.checkpoint()
            if limiter.snapshot().requests_last_minute and not limiter._sleeping:
                break  # all started: every deadline was seen on the way
        deadlines.setdefault(0, 0.0)  # slot 0 starts at once, before it can be seen asleep
    assert sorted(deadlines) == [ms * 1_000 for ms in range(20)]
    assert {slot: at for slot, at in deadlines.items()} == {
        slot: (0.0 if slot == 0 else 0.01 if slot <= 10_000 else 0.02) for slot in deadlines
    }
    assert limiter.snapshot().requests_last_minute == 20


def test_slots_far_apart_start_each_at_its_own() -> None:
    assert LocalLimiter(rpm=450, tpm=0).start_tick == 0
    assert LocalLimiter(rpm=6_000, tpm=0).start_tick == 0  # 10 ms apart: a tick holds one
    assert LocalLimiter(rpm=12_000, tpm=0).start_tick == 10_000
    assert LocalLimiter(rpm=0, tpm=90_000).start_tick == 0


@pytest.mark.anyio
async def test_pause_takes_back_sleeping_slots_in_order() -> None:
    limiter = LocalLimiter(rpm=600, tpm=0)
    grants: list[tuple[int, Grant]] = []

    async def one(index: int) -> None:
        grants.append((index, await limiter.acquire(0)))

    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(one, index)
        # Wait for: 0 granted, 1..3 asleep towards their slots.
        while len(grants) < 1 or len(limiter._sleeping) < 3:
            await anyio.lowlevel.checkpoint()
        await limiter.pause(0.2, rate_limited=True)
        paused_until = limiter._state.paused_until  # white-box: the core's state
    assert [index for index, _ in grants] == [0, 1, 2, 3]
    later = [grant.slot_us for _, grant in grants[1:]]
    assert later[0] >= paused_until
    assert_spaced(later, 100_000)
    snapshot = limiter.snapshot()
    assert snapshot.rate_limited_total == 1
    assert snapshot.paused_until is None  # over by now


@pytest.mark.anyio
async def test_a_cancelled_waiter_loses_its_slot_and_cancellation_propagates() -> None:
    limiter = LocalLimiter(rpm=1_200, tpm=0)  # 50 ms apart
    first = await limiter.acquire(0)
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire(0)
    assert scope.cancelled_caught
    assert limiter.snapshot().waiters == 0
    assert not limiter._queue and not limiter._sleeping
    third = await limiter.acquire(0)
    assert third.slot_us - first.slot_us >= 2 * 50_000  # the hole stays a hole


@pytest.mark.anyio
async def test_no_budget_grants_at_once_but_honours_a_pause() -> None:
    now = [1_000.0]
    limiter = LocalLimiter(rpm=0, tpm=0, clock=lambda: now[0])
    grant = await limiter.acquire(40)
    await limiter.settle(grant, 100)
    assert grant.waited == 0
    snapshot = limiter.snapshot()
    assert (snapshot.requests_last_minute, snapshot.tokens_last_minute) == (1, 100)
    assert snapshot.rpm == 0
    now[0] += 60.5
    assert limiter.snapshot().requests_last_minute == 0
    await limiter.pause(0.05, rate_limited=False)
    assert limiter.snapshot().paused_until is not None
    with pytest.raises(ValueError):
        await limiter.acquire(-1)


@asynccontextmanager
async def open_pool(url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = AsyncConnectionPool(url, min_size=1, max_size=2, open=False, kwargs={"autocommit": True})
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


async def limiter_row(url: str) -> tuple[Any, ...]:
    (row,) = await query(
        url,
        "SELECT (extract(epoch FROM request_tat) * 1e6)::bigint,"
        " (extract(epoch FROM paused_until) * 1e6)::bigint, rate_limited_total"
        " FROM rate_limiters WHERE name = 'openai'",
    )
    return row


@pytest.mark.anyio
async def test_two_processes_share_one_schedule(database_url: str) -> None:
    async with open_pool(database_url) as pool_a, open_pool(database_url) as pool_b:
        a = PostgresLimiter(pool_a, "openai", rpm=600, tpm=0)
        b = PostgresLimiter(pool_b, "openai", rpm=600, tpm=0)
        results: dict[str, list[Grant]] = {}

        async def run(name: str, limiter: PostgresLimiter) -> None:
            results[name] = await acquire_in_order(limiter, 10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a", a)
            tg.start_soon(run, "b", b)
    # FIFO within each process; one schedule on the database's clock across both.
    for grants in results.values():
        assert_spaced([g.slot_us for g in grants], 100_000)
    slots = sorted(g.slot_us for grants in results.values() for g in grants)
    assert len(set(slots)) == 20
    assert_spaced(slots, 100_000)
    assert (await limiter_row(database_url))[0] == slots[-1] + 100_000


@pytest.mark.anyio
async def test_at_a_big_budget_two_processes_share_one_row_a_statement_for_many_slots(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60,000 RPM (1 ms apart), 16 waiters a process at once, as a worker's seekers at that
    # budget: one schedule on the database's clock, and a statement grants many slots.
    async with open_pool(database_url) as pool_a, open_pool(database_url) as pool_b:
        limiters = {
            name: PostgresLimiter(pool, "openai", rpm=60_000, tpm=0)
            for name, pool in (("a", pool_a), ("b", pool_b))
        }
        statements: list[str] = []
        for limiter in limiters.values():
            execute = limiter._execute

            async def counted(
                block: str, params: dict[str, Any], execute: Any = execute
            ) -> tuple[Any, ...]:
                statements.append(block)
                return await execute(block, params)

            monkeypatch.setattr(limiter, "_execute", counted)
        results: dict[str, list[Grant]] = {"a": [], "b": []}

        async def rounds(name: str) -> None:
            for _ in range(4):
                results[name] += await acquire_in_order(limiters[name], 16)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rounds, "a")
            tg.start_soon(rounds, "b")
    slots = sorted(g.slot_us for grants in results.values() for g in grants)
    assert len(set(slots)) == 128
    assert_spaced(slots, 1_000)
    assert len(statements) <= 128 / 4, f"{len(statements)} statements for 128 slots"


@pytest.mark.anyio
async def test_a_pause_reaches_the_other_process(database_url: str) -> None:
    async with open_pool(database_url) as pool_a, open_pool(database_url) as pool_b:
        a = PostgresLimiter(pool_a, "openai", rpm=600, tpm=0)
        b = PostgresLimiter(pool_b, "openai", rpm=600, tpm=0)
        first = await a.acquire(0)
        await a.pause(0.3, rate_limited=True)
        await a.pause(0.1, rate_limited=False)  # shorter: changes nothing but is recorded
        _, paused_until, rate_limited_total = await limiter_row(database_url)
        assert paused_until >= first.slot_us + 300_000
        assert rate_limited_total == 1
        assert a.snapshot().rate_limited_total == 1
        assert a.snapshot().paused_until is not None
        second = await b.acquire(0)
        assert second.slot_us >= paused_until


@pytest.mark.anyio
async def test_one_process_batches_its_waiters_in_fifo_order(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_pool(database_url) as pool:
        limiter = PostgresLimiter(pool, "openai", rpm=6_000, tpm=0)
        statements: list[str] = []
        execute = limiter._execute

        async def counted(block: str, params: dict[str, Any]) -> tuple[Any, ...]:
            statements.append(block)
            return await execute(block, params)

        monkeypatch.setattr(limiter, "_execute", counted)
        grants = await acquire_in_order(limiter, 12)
    assert_spaced([g.slot_us for g in grants], 10_000)
    # Concurrent waiters share statements (here all 12 go in one or two).
    assert 1 <= len(statements) <= 2


@pytest.mark.anyio
async def test_the_sql_does_the_core_arithmetic(database_url: str) -> None:
    rpm, tpm = 450, 40_000
    rng = random.Random(11)
    async with open_pool(database_url) as pool:
        limiter = PostgresLimiter(pool, "openai", rpm=rpm, tpm=tpm)
        # Past a long pause, `now` never binds, so the database's clock drops out of the
        # comparison and its slots must equal the core's to the microsecond. White-box: the
        # reservations are made without sleeping to them.
        await limiter.pause(300, rate_limited=False)
        start = (await limiter_row(database_url))[1]
        state = GcraState(start, start, start)
        for _ in range(30):
            tokens = [rng.randint(0, 3_000) for _ in range(rng.randint(1, 5))]
            reservation = await limiter._reserve(tokens)
            expected, state = reserve(state, 0, tokens, rpm, tpm)
            assert reservation.slots_us == expected
            delta = rng.randint(-500, 1_500)
            limiter._settle(delta)  # rides along with the next reservation
            state = settle(state, 0, delta, tpm)


@pytest.mark.anyio
async def test_without_budget_the_database_is_never_touched(database_url: str) -> None:
    closed = AsyncConnectionPool(database_url, open=False)
    free = PostgresLimiter(closed, "openai", rpm=0, tpm=0)
    grant = await free.acquire(100)
    await free.settle(grant, 120)
    await free.pause(0.01, rate_limited=True)
    assert free.snapshot().rate_limited_total == 1
    # With a budget the same closed pool fails, wrapped, and leaves no waiter behind.
    budgeted = PostgresLimiter(closed, "openai", rpm=600, tpm=0)
    with pytest.raises(DatabaseError, match="rate limiter 'openai': reserve"):
        await budgeted.acquire(100)
    assert budgeted.snapshot().waiters == 0
    assert not budgeted._queue


def test_make_limiter_picks_by_budget() -> None:
    pool = AsyncConnectionPool("", open=False)
    shared = make_limiter(pool, Settings(rate_limit_rpm=450, rate_limit_tpm=0))
    assert isinstance(shared, PostgresLimiter)
    assert shared.name == "openai"
    free = make_limiter(pool, Settings(rate_limit_rpm=0, rate_limit_tpm=0))
    assert isinstance(free, LocalLimiter)
    assert isinstance(make_limiter(None, Settings()), LocalLimiter)


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", [math.inf, 1e300])
async def test_an_endless_pause_is_cut_to_a_day_not_refused(seconds: float) -> None:
    now = [1_000.0]
    limiter = LocalLimiter(rpm=60, tpm=0, clock=lambda: now[0])
    await limiter.pause(seconds, rate_limited=True)
    paused_until = limiter.snapshot().paused_until
    assert paused_until is not None
    assert paused_until - time.time() == pytest.approx(MAX_PAUSE_SECONDS, abs=60)
    with pytest.raises(ValueError):
        await limiter.pause(math.nan, rate_limited=True)
