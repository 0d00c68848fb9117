"""The budget of one process alone: the GCRA state in memory (tests, a worker with no budget)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from listener.limiter import gcra
from listener.limiter.queue import QueueLimiter, Reservation, micros_to_seconds


class LocalLimiter(QueueLimiter):
    """The budget of this process alone: the GCRA state in memory, on `clock` (monotonic)."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rpm, tpm, clock)
        self._state = gcra.GcraState()

    def _now_us(self) -> int:
        return math.floor(self._clock() * gcra.MICROS_PER_SECOND)

    async def _reserve(self, tokens: list[int]) -> Reservation:
        slots, self._state = gcra.reserve(self._state, self._now_us(), tokens, self.rpm, self.tpm)
        paused_until = self._state.paused_until
        return Reservation(slots, 0, 0.0, paused_until, micros_to_seconds(paused_until))

    async def _pause(self, seconds: float, rate_limited: bool) -> tuple[int, float]:
        duration = gcra.to_micros(seconds)
        self._state = gcra.pause(self._state, self._now_us(), duration, rate_limited=rate_limited)
        return self._state.paused_until, micros_to_seconds(self._state.paused_until)

    def _settle(self, delta_tokens: int) -> None:
        self._state = gcra.settle(self._state, self._now_us(), delta_tokens, self.tpm)
