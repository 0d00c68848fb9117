"""Unit tests for backoff arithmetic (pure, seeded randomness)."""

from __future__ import annotations

import itertools
import random

import pytest

from listener.backoff import Backoff, delay_ceiling, retry_delay


def test_ceiling_doubles_from_base_then_caps() -> None:
    ceilings = [delay_ceiling(k, 0.5, 10.0) for k in range(1, 9)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_ceiling_is_monotone_and_never_exceeds_cap() -> None:
    ceilings = [delay_ceiling(k, 0.1, 30.0) for k in range(1, 200)]
    assert all(a <= b for a, b in itertools.pairwise(ceilings))
    assert max(ceilings) == 30.0


def test_huge_attempt_does_not_overflow() -> None:
    assert delay_ceiling(10_000, 1.0, 60.0) == 60.0
    assert retry_delay(10**9, 1.0, 60.0, random.Random(0)) <= 60.0


def test_first_retry_is_about_base() -> None:
    rng = random.Random(1)
    delays = [retry_delay(1, 2.0, 60.0, rng) for _ in range(1000)]
    assert all(1.0 <= d <= 2.0 for d in delays)


def test_jitter_within_equal_jitter_bounds() -> None:
    rng = random.Random(42)
    for attempt in range(1, 30):
        ceiling = delay_ceiling(attempt, 0.25, 20.0)
        for _ in range(200):
            delay = retry_delay(attempt, 0.25, 20.0, rng)
            assert ceiling / 2 <= delay <= ceiling


def test_jitter_actually_varies_and_spans_the_range() -> None:
    rng = random.Random(3)
    delays = [retry_delay(5, 1.0, 100.0, rng) for _ in range(2000)]  # ceiling 16
    assert len(set(delays)) > 1000
    assert min(delays) < 8.5
    assert max(delays) > 15.5


def test_seeded_rng_is_deterministic() -> None:
    a = [retry_delay(k, 1.0, 60.0, random.Random(9)) for k in range(1, 10)]
    b = [retry_delay(k, 1.0, 60.0, random.Random(9)) for k in range(1, 10)]
    assert a == b


def test_zero_base_means_no_delay() -> None:
    assert retry_delay(3, 0.0, 0.0, random.Random(0)) == 0.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(0, 1.0, 10.0), (-1, 1.0, 10.0), (1, -1.0, 10.0), (1, 5.0, 1.0)],
)
def test_invalid_arguments_raise(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, base, cap, random.Random(0))


def test_backoff_rejects_bad_config_up_front() -> None:
    with pytest.raises(ValueError):
        Backoff(base=5.0, cap=1.0)


def test_backoff_escalates_like_retry_delay() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(5))
    reference = random.Random(5)
    for attempt in range(1, 12):
        assert backoff.next() == retry_delay(attempt, 0.5, 8.0, reference)
        assert backoff.attempt == attempt


def test_backoff_caps_and_stays_within_bounds() -> None:
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(11))
    delays = [backoff.next() for _ in range(50)]
    assert all(d <= 30.0 for d in delays)
    assert all(d >= 15.0 for d in delays[5:])  # ceiling reached cap at attempt 6


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(2))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.attempt == 0
    first = backoff.next()
    assert 0.5 <= first <= 1.0
    assert backoff.attempt == 1


def test_backoff_default_rng() -> None:
    delay = Backoff(base=1.0, cap=2.0).next()
    assert 0.5 <= delay <= 1.0
