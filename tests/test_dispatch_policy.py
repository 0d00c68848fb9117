"""The claimer's side of the store policy, pure: which stores a scan puts in the ring, and when
the others come back (an injected clock, no database)."""

from __future__ import annotations

from listener.dispatch import Dispatcher
from listener.items import ReadyStore
from tests.support import new_dispatcher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _dispatcher(clock: Clock) -> Dispatcher:
    return new_dispatcher(None, clock)  # no claim is made here: the pool is never touched


def test_a_scan_puts_only_due_unpaused_stores_in_the_ring() -> None:
    clock = Clock()
    dispatcher = _dispatcher(clock)
    policies: list[tuple[object, ...]] = [
        ("paused", 1, None, None, True),
        ("heavy", 5, None, None, False),
    ]
    dispatcher.rebuild(
        policies,
        [
            ReadyStore("due", 0.0),
            ReadyStore("heavy", 0.0),
            ReadyStore("in-backoff", 5.0),
            ReadyStore("paused", 0.0),
        ],
    )
    assert sorted(dispatcher.ring) == ["due", "heavy"]
    assert dispatcher.policies.weight("heavy") == 5 and dispatcher.policies.weight("due") == 1
    # The store in backoff gets one wake-up for when its first item is due, however many sweeps
    # find it again meanwhile.
    assert dispatcher._wakeups == [(105.0, "in-backoff")]
    clock.now = 101.0
    dispatcher.rebuild(policies, [ReadyStore("in-backoff", 4.0)])
    assert dispatcher._wakeups == [(105.0, "in-backoff")]
    # A notification for a paused store is ignored; the scan's policy change applies at once.
    dispatcher.notify("paused")
    assert "paused" not in dispatcher.ring
    dispatcher.rebuild([], [ReadyStore("paused", 0.0)])
    assert "paused" in dispatcher.ring and dispatcher.policies.weight("heavy") == 1


def test_a_store_held_by_its_rpm_limit_ignores_notifications_until_due() -> None:
    clock = Clock()
    dispatcher = _dispatcher(clock)
    dispatcher._held_until["capped"] = 101.0
    dispatcher.notify("capped")
    assert "capped" not in dispatcher.ring
    clock.now = 101.0
    dispatcher.notify("capped")
    assert "capped" in dispatcher.ring
    assert dispatcher._held_until == {}


def test_pausing_by_a_scan_takes_the_store_out_of_the_ring() -> None:
    dispatcher = _dispatcher(Clock())
    dispatcher.notify("shop")
    assert "shop" in dispatcher.ring
    dispatcher.rebuild([("shop", 1, None, None, True)], [ReadyStore("shop", 0.0)])
    assert "shop" not in dispatcher.ring
