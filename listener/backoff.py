"""Exponential backoff with "equal jitter", for item retries and reconnect loops.

Pure arithmetic: randomness comes from an injected `random.Random`, so tests (and
simulations) are deterministic with a seeded instance.

The ceiling for attempt k (1-based) is `min(cap, base * 2 ** (k - 1))`; the delay
is drawn uniformly from `[ceiling / 2, ceiling]`.

Why equal jitter rather than the alternatives:
- *Full jitter* (`uniform(0, ceiling)`) spreads retries best but can return ~0,
  i.e. an immediate retry: exactly wrong when the database is down or OpenAI just
  rate-limited us. Equal jitter guarantees at least half the ceiling, and still
  spreads a thundering herd over a factor of two.
- *Decorrelated jitter* derives each delay from the previous one, so it needs
  state. Item retries only have the attempt count stored on the job row, so a
  function of `attempt` is what fits; `Backoff` then uses the same arithmetic
  for reconnects, so there is one behaviour to reason about.
"""

from __future__ import annotations

import random

# 2.0 ** 1023 is the largest finite power of two; past ~60 doublings any sane
# base has long exceeded any sane cap, so clamp the exponent to avoid overflow.
_MAX_EXPONENT = 60


def _validate(base: float, cap: float) -> None:
    if base < 0:
        raise ValueError(f"backoff base must be >= 0, got {base!r}")
    if cap < base:
        raise ValueError(f"backoff cap must be >= base, got cap={cap!r} base={base!r}")


def delay_ceiling(attempt: int, base: float, cap: float) -> float:
    """The un-jittered delay for `attempt` (1-based): base doubling, capped at cap."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt!r}")
    _validate(base, cap)
    return min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (1 -> about `base`).

    Uniform in `[ceiling / 2, ceiling]` where ceiling = `delay_ceiling(...)`.
    """
    ceiling = delay_ceiling(attempt, base, cap)
    return rng.uniform(ceiling / 2, ceiling)


class Backoff:
    """Stateful wrapper for reconnect loops: `next()` after each failure, `reset()`
    after a success. Same arithmetic as `retry_delay`."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        _validate(base, cap)
        self.base = base
        self.cap = cap
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since the last reset."""
        return self._attempt

    def next(self) -> float:
        """The delay to sleep before the next attempt; escalates on every call."""
        self._attempt += 1
        return retry_delay(self._attempt, self.base, self.cap, self._rng)

    def reset(self) -> None:
        """Back to the first, shortest delay (call once connected again)."""
        self._attempt = 0
