"""How one process's worker tasks wait for the shared limiter: the `Limiter` they call, the
`Grant` they get, and `QueueLimiter`, the waiting half common to both backends (`limiter.py`).

Within a process, waiters are served first come, first served: they queue, and whoever holds
the reservation lock reserves slots for the whole queue at once, so a process pays one short
statement per batch of concurrent waiters (at most one per request). A pause (a 429's
retry-after, or the request budget's reset) moves every later slot past its end; when it
covers the slot of a waiter of this process already asleep, all of them go back to the head of
the queue, in order, and reserve again. A pause made by another process reaches this one with
its next reservation; until then, slots it already holds still fire.

Cancellation is never swallowed: a cancelled waiter leaves the queue and its slot, if it had
one, goes unused (a hole in the schedule: capacity lost, no bound broken). A reservation in
flight is shielded (with a timeout), so cancelling its waiter cannot lose the slots it is
fetching for the others.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from listener.limiter import gcra

# One logger name for the whole limiter, whichever of its modules writes the line.
logger = logging.getLogger("listener.limiter")

WINDOW_SECONDS = 60.0
# The longest pause: see `QueueLimiter.pause`.
MAX_PAUSE_SECONDS = 86_400.0
# One statement's batch; a larger queue simply takes several statements.
MAX_BATCH = 256
# When slots come closer than this (above 6,000 RPM), a process starts its slots of one tick
# together (gcra.fire_at, which keeps every bound): its workers then ask for their items at the
# same moment and share one claim, and a request starts at most one tick after its slot. With
# slots further apart a tick would hold one slot at most: each starts at its own.
START_TICK_US = 10_000


@dataclass(frozen=True, slots=True)
class Grant:
    """Leave to send one request, to be settled with the actual token count afterwards."""

    # The slot in microseconds on the limiter's clock: the process's monotonic clock for
    # LocalLimiter (and any limiter with both budgets off), Unix time on the database's clock
    # for PostgresLimiter.
    slot_us: int
    estimated_tokens: int
    waited: float  # seconds spent in acquire

    @property
    def slot(self) -> float:
        return self.slot_us / gcra.MICROS_PER_SECOND


@dataclass(frozen=True, slots=True)
class LimiterSnapshot:
    """This process's figures (the fleet's are in the `rate_limiters` row)."""

    waiters: int  # tasks inside acquire
    requests_last_minute: int  # granted by this process in the last 60 s
    tokens_last_minute: int  # estimated tokens of those grants, corrected by their settles
    rate_limited_total: int  # 429s reported to this process's limiter
    paused_until: float | None  # Unix time (time.time()) the pause known here ends; None: none
    rpm: int
    tpm: int


class Limiter(Protocol):
    async def acquire(self, estimated_tokens: int) -> Grant: ...

    async def settle(self, grant: Grant, actual_tokens: int) -> None: ...

    async def pause(self, seconds: float, *, rate_limited: bool) -> None: ...

    def snapshot(self) -> LimiterSnapshot: ...


class _Ticket:
    """One waiter: queued (no slot yet) or sleeping towards its slot."""

    __slots__ = ("abandoned", "deadline", "slot_us", "tokens", "woken")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.slot_us: int | None = None
        self.deadline = 0.0  # the slot on this process's clock
        self.woken = anyio.Event()  # set when a pause takes the slot back
        self.abandoned = False


@dataclass(frozen=True, slots=True)
class Reservation:
    """Slots a backend reserved for a batch of waiters, and the pause it saw."""

    slots_us: list[int]  # limiter clock
    # The limiter's instant `at_us` is `at` on this process's clock: one pair for the whole
    # reservation, so slots of one tick get the very same deadline (one timer instant).
    at_us: int
    at: float
    paused_until_us: int  # the pause the reservation saw (limiter clock)
    pause_deadline: float  # its end on this process's clock

    def deadline(self, instant_us: int) -> float:
        """A limiter instant on this process's clock."""
        return self.at + micros_to_seconds(instant_us - self.at_us)


class QueueLimiter(abc.ABC):
    """FIFO waiters, batched reservations, pauses reaching sleepers, and the local figures."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float]) -> None:
        gcra.request_interval(rpm)  # validates both rates
        gcra.token_interval(0, tpm)
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._off = rpm == 0 and tpm == 0
        step = gcra.request_interval(rpm)
        self.start_tick = START_TICK_US if 0 < step < START_TICK_US else 0
        self._queue: deque[_Ticket] = deque()
        self._sleeping: dict[_Ticket, int] = {}  # ticket -> slot, the tickets holding a slot
        self._lock = anyio.Lock()  # FIFO: waiters take turns at reserving
        self._waiters = 0
        self._paused_until_us = 0
        self._pause_deadline = -math.inf
        self._rate_limited_total = 0
        self._window: deque[tuple[float, int, int]] = deque()  # (time, requests, tokens)
        self._window_requests = 0
        self._window_tokens = 0

    @abc.abstractmethod
    async def _reserve(self, tokens: list[int]) -> Reservation: ...

    @abc.abstractmethod
    async def _pause(self, seconds: float, rate_limited: bool) -> tuple[int, float]:
        """Apply a pause; return its end on the limiter's clock and on this process's."""

    @abc.abstractmethod
    def _settle(self, delta_tokens: int) -> None: ...

    async def acquire(self, estimated_tokens: int) -> Grant:
        """Return at this caller's slot; FIFO among this process's callers."""
        if estimated_tokens < 0:
            raise ValueError(f"estimated tokens must be >= 0, got {estimated_tokens!r}")
        started = self._clock()
        self._waiters += 1
        try:
            if self._off:
                if self._pause_deadline > started:  # a 429 paused every request
                    await anyio.sleep(self._pause_deadline - started)
                slot = math.floor(self._clock() * gcra.MICROS_PER_SECOND)
            else:
                slot = await self._wait_for_slot(estimated_tokens)
        finally:
            self._waiters -= 1
        now = self._clock()
        self._record(now, 1, estimated_tokens)
        return Grant(slot, estimated_tokens, now - started)

    async def settle(self, grant: Grant, actual_tokens: int) -> None:
        """Correct the token budget with what the request really used."""
        if actual_tokens < 0:
            raise ValueError(f"actual tokens must be >= 0, got {actual_tokens!r}")
        delta = actual_tokens - grant.estimated_tokens
        if delta:
            self._record(self._clock(), 0, delta)
            if self.tpm:
                self._settle(delta)

    async def pause(self, seconds: float, *, rate_limited: bool) -> None:
        """Hold every waiter of every process for `seconds` from now (at most MAX_PAUSE_SECONDS:
        a longer one, or an infinite one, is cut to it rather than refused)."""
        if not seconds >= 0:  # NaN too
            raise ValueError(f"a pause lasts a number of seconds >= 0, got {seconds!r}")
        # A day: past it, a server's "wait" is no reset time but a broken header, and the
        # microseconds of a huge one would not fit the limiter's interval.
        seconds = min(seconds, MAX_PAUSE_SECONDS)
        if rate_limited:
            self._rate_limited_total += 1
        logger.info(
            "rate limiter paused for %.1f s (%s)",
            seconds,
            "429 from openai" if rate_limited else "request budget exhausted",
        )
        if self._off:  # no shared schedule: hold this process's waiters only
            self._pause_deadline = max(self._pause_deadline, self._clock() + seconds)
            return
        self._note_pause(*await self._pause(seconds, rate_limited))

    def snapshot(self) -> LimiterSnapshot:
        now = self._clock()
        self._prune(now)
        remaining = self._pause_deadline - now
        return LimiterSnapshot(
            waiters=self._waiters,
            requests_last_minute=self._window_requests,
            tokens_last_minute=max(0, self._window_tokens),
            rate_limited_total=self._rate_limited_total,
            paused_until=time.time() + remaining if remaining > 0 else None,
            rpm=self.rpm,
            tpm=self.tpm,
        )

    async def _wait_for_slot(self, tokens: int) -> int:
        ticket = _Ticket(tokens)
        self._queue.append(ticket)
        try:
            while True:
                while ticket.slot_us is None:
                    await self._reserve_queued(ticket)
                with anyio.move_on_after(ticket.deadline - self._clock()):
                    await ticket.woken.wait()
                self._sleeping.pop(ticket, None)
                if ticket.slot_us is not None:
                    return ticket.slot_us
                # A pause took the slot back and requeued the ticket at the head: go again.
        finally:
            ticket.abandoned = True
            self._sleeping.pop(ticket, None)
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)

    async def _reserve_queued(self, ticket: _Ticket) -> None:
        async with self._lock:
            if ticket.slot_us is not None:
                return  # the waiter before us reserved for the whole queue, us included
            batch: list[_Ticket] = []
            while self._queue and len(batch) < MAX_BATCH:
                queued = self._queue.popleft()
                if not queued.abandoned:
                    batch.append(queued)
            if not batch:
                return
            try:
                reservation = await self._reserve([t.tokens for t in batch])
            except BaseException:
                # Nobody got a slot: the others keep their place, and one of them tries next.
                self._queue.extendleft(reversed([t for t in batch if not t.abandoned]))
                raise
            for queued, slot in zip(batch, reservation.slots_us, strict=True):
                if not queued.abandoned:  # an abandoned ticket's slot is lost
                    queued.slot_us = slot
                    queued.deadline = reservation.deadline(gcra.fire_at(slot, self.start_tick))
                    queued.woken = anyio.Event()
                    self._sleeping[queued] = slot
            self._note_pause(reservation.paused_until_us, reservation.pause_deadline)

    def _note_pause(self, paused_until_us: int, pause_deadline: float) -> None:
        """When a pause covers a sleeper's slot, take back every slot; the waiters requeue at
        the head, in order, and reserve again past the pause.

        All of them, not only the covered ones, or a later waiter would keep its earlier slot
        (FIFO lost); the uncovered slots become holes. Checked after every reservation too: one
        fetched just before a pause landed in the row can come back after the pause's answer.
        """
        self._pause_deadline = max(self._pause_deadline, pause_deadline)
        self._paused_until_us = max(self._paused_until_us, paused_until_us)
        if all(slot >= self._paused_until_us for slot in self._sleeping.values()):
            return
        covered = sorted(self._sleeping.items(), key=lambda item: item[1])
        for ticket, _slot in covered:
            del self._sleeping[ticket]
            ticket.slot_us = None
            ticket.woken.set()
        self._queue.extendleft(reversed([ticket for ticket, _slot in covered]))

    def _record(self, now: float, requests: int, tokens: int) -> None:
        self._window.append((now, requests, tokens))
        self._window_requests += requests
        self._window_tokens += tokens
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - WINDOW_SECONDS:
            _at, requests, tokens = self._window.popleft()
            self._window_requests -= requests
            self._window_tokens -= tokens


def micros_to_seconds(micros: int) -> float:
    return micros / gcra.MICROS_PER_SECOND
