"""The OpenAI stub's rate-limit arithmetic: a sliding window with its busiest moment, and the
Go-style durations OpenAI writes in its x-ratelimit-reset-* headers.

Pure and clock-free (callers pass `now`), so tests can drive it with made-up times.
"""

from __future__ import annotations

import math
from collections import deque


def ceil_ignoring_float_noise(x: float) -> int:
    # Rounding first stops float noise such as (t + 60) - t == 60.0000000000018 from
    # turning into an extra second or millisecond.
    return math.ceil(round(x, 6))


def format_duration(seconds: float) -> str:
    """Format like OpenAI's x-ratelimit-reset-* headers (Go durations): 120ms, 1.5s, 6m0s."""
    total_ms = max(0, ceil_ignoring_float_noise(seconds * 1000))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class SlidingWindow:
    """Weighted events of the last ``length`` s (``now - t < length``) and the busiest window.

    ``peak`` is exact: the fullest window can be slid right until it ends on an event, and
    the total is measured at every event.
    """

    def __init__(self, length: float) -> None:
        self.length = length
        self.peak = 0
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= self.length:
            self._total -= self._events.popleft()[1]

    def total(self, now: float) -> int:
        self._prune(now)
        return self._total

    def add(self, now: float, weight: int = 1) -> None:
        self._prune(now)
        self._events.append((now, weight))
        self._total += weight
        self.peak = max(self.peak, self._total)

    def wait_until_fits(self, now: float, weight: int, limit: int) -> float:
        """Seconds until ``weight`` more fits under ``limit`` (0 if it fits now)."""
        excess = self.total(now) + weight - limit
        if excess <= 0:
            return 0.0
        if weight > limit:
            return self.length  # never fits; OpenAI still answers with a finite wait
        for t, w in self._events:
            excess -= w
            if excess <= 0:
                return t + self.length - now
        return self.length

    def time_until_empty(self, now: float) -> float:
        self._prune(now)
        return self._events[-1][0] + self.length - now if self._events else 0.0

    def clear(self) -> None:
        self._events.clear()
        self._total = 0
        self.peak = 0
