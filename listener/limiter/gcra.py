"""The rate limiter's arithmetic: the generic cell rate algorithm (GCRA), pure and clock-free.

Every time is an integer count of microseconds on one clock (the caller's: a fake clock in
tests, the process's monotonic clock for `LocalLimiter`, the database's clock for
`PostgresLimiter`). Integers because microseconds are the resolution of `timestamptz`: the SQL
in `sql/limiter.sql` then does bit-identical arithmetic, and the bounds below hold exactly
rather than up to float rounding.

The state holds two "theoretical arrival times": `request_tat`, the earliest start of the next
request under the RPM budget, and `token_tat`, the same under the TPM budget. A request may
start at `start = max(now, request_tat, token_tat, paused_until)`; it then moves `request_tat`
to `start + 60 s / rpm` and `token_tat` to `start + tokens x 60 s / tpm`. Both steps are
rounded UP to the microsecond, so rounding can only slow the limiter down. An idle limiter
builds no credit (the TATs never lag behind `now` in the formula), hence no burst.

Bounds, for the slots handed out from one state (i.e. every process sharing one row), over
any half-open window [t, t + 60 s):
- at most `rpm` slots: consecutive slots are at least 60 s / rpm apart, so m slots span at
  least (m - 1) x 60 s / rpm, which is under 60 s only when m <= rpm;
- at most `tpm - 1 + t_last` estimated tokens, where `t_last` is the window's last request's
  estimate (so always under `tpm` + one request's tokens): each slot is at least its
  predecessor's token time after it, so the tokens of every slot but the last fit in < 60 s.
- under saturation the limit is met: with waiters always queued, slots are exactly one step
  apart, so the loss is the microsecond rounding (under 0.01 % at any realistic rate).
- the bounds hold as well when each request starts not at its slot but at `fire_at(slot, tick)`,
  the slot rounded up to a grid of `tick` that divides the minute: the requests started in
  [t, t + 60 s) are those whose slots lie in (G - tick, G'] for the grid's first point G >= t and
  its last G' < t + 60 s, a half-open span of G' - G + tick <= 60 s, which holds no more than a
  half-open minute does. That is what lets a process start the slots of one tick together (one
  claim for several workers) without ever exceeding the budget.
`settle` replaces an estimate with the actual count; a correction reaches only the slots
reserved after it, so the TPM bound holds for actual tokens when each request is settled
before the next is reserved, and otherwise is off by the corrections still in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

MICROS_PER_SECOND = 1_000_000
MINUTE = 60 * MICROS_PER_SECOND


def to_micros(seconds: float) -> int:
    """Seconds as whole microseconds, rounded up (a pause is never shortened)."""
    return math.ceil(seconds * MICROS_PER_SECOND)


def request_interval(rpm: int) -> int:
    """Microseconds between two requests under `rpm`; 0 when the request budget is off."""
    _check_rate("rpm", rpm)
    return 0 if rpm == 0 else -(-MINUTE // rpm)


def token_interval(tokens: int, tpm: int) -> int:
    """Microseconds of the token budget that `tokens` use (negative for a refund); 0 when off.

    Rounded up whatever the sign: a charge grows, a refund shrinks, both err on the safe side.
    """
    _check_rate("tpm", tpm)
    return 0 if tpm == 0 else -(-(tokens * MINUTE) // tpm)


def slots_within(rpm: int, span: int) -> int:
    """The most slots of an `rpm` budget that `span` microseconds hold (0 when it is off)."""
    return 0 if rpm == 0 else -(-span // request_interval(rpm))


def fire_at(slot: int, tick: int) -> int:
    """When a request may start that holds `slot`: the slot rounded up to the grid of `tick`.

    `tick` must divide the minute for the bounds to hold (see above); 0 or 1 is the slot itself.
    """
    if tick < 0 or (tick and MINUTE % tick):
        raise ValueError(f"a tick divides the minute in microseconds, got {tick!r}")
    return slot if tick <= 1 else -(-slot // tick) * tick


def _check_rate(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 turns the budget off), got {value!r}")


@dataclass(frozen=True, slots=True)
class GcraState:
    """One limiter's shared state: the columns of a `rate_limiters` row, in microseconds."""

    request_tat: int = 0
    token_tat: int = 0
    paused_until: int = 0
    rate_limited_total: int = 0

    def start(self, now: int) -> int:
        """The earliest slot a request reserved at `now` can get."""
        return max(now, self.request_tat, self.token_tat, self.paused_until)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Where the slots of k back-to-back requests fall relative to the first one.

    Reserving a batch equals reserving its requests one by one at the same `now`: after the
    first, each start is its predecessor's plus the larger of the two steps, as `now` and
    `paused_until` no longer bind. So a batch is one start plus these fixed offsets, which is
    what lets the SQL reserve for many waiters in one short statement.
    """

    offsets: tuple[int, ...]
    request_advance: int  # request_tat = first slot + request_advance
    token_advance: int  # token_tat = first slot + token_advance


def plan_batch(tokens: Sequence[int], rpm: int, tpm: int) -> BatchPlan:
    """The offsets of a batch of requests with these estimated tokens, in order."""
    if not tokens:
        raise ValueError("a batch holds at least one request")
    if any(t < 0 for t in tokens):
        raise ValueError(f"estimated tokens must be >= 0, got {list(tokens)!r}")
    step = request_interval(rpm)
    offsets = [0]
    for previous in tokens[:-1]:
        offsets.append(offsets[-1] + max(step, token_interval(previous, tpm)))
    last = offsets[-1]
    return BatchPlan(tuple(offsets), last + step, last + token_interval(tokens[-1], tpm))


def reserve(
    state: GcraState, now: int, tokens: Sequence[int], rpm: int, tpm: int
) -> tuple[list[int], GcraState]:
    """Slots for requests with these estimated tokens, in order, and the state after them."""
    plan = plan_batch(tokens, rpm, tpm)
    start = state.start(now)
    slots = [start + offset for offset in plan.offsets]
    after = replace(
        state, request_tat=start + plan.request_advance, token_tat=start + plan.token_advance
    )
    return slots, after


def settle(state: GcraState, now: int, delta_tokens: int, tpm: int) -> GcraState:
    """Correct the token budget by `actual - estimated` tokens of a granted request.

    A refund moves `token_tat` back, but never before `now`: time that passed is not credit.
    """
    if tpm == 0 or delta_tokens == 0:
        return state
    return replace(state, token_tat=max(state.token_tat + token_interval(delta_tokens, tpm), now))


def pause(state: GcraState, now: int, duration: int, *, rate_limited: bool) -> GcraState:
    """Hold every later slot until `now + duration` (a pause never shortens an earlier one).

    Both TATs move to at least the pause's end, so the first slots after it are spaced as
    usual: a pause ends without a burst.
    """
    if duration < 0:
        raise ValueError(f"a pause lasts >= 0 microseconds, got {duration!r}")
    until = max(state.paused_until, now + duration)
    return GcraState(
        request_tat=max(state.request_tat, until),
        token_tat=max(state.token_tat, until),
        paused_until=until,
        rate_limited_total=state.rate_limited_total + int(rate_limited),
    )
