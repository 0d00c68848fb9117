"""Unit tests for the ready ring (pure, no database)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from listener.items import split_quota
from listener.ring import ReadyRing
from tests.support import new_dispatcher


def _entries(ring: ReadyRing) -> int:
    # White-box: total deque entries, live ones plus tombstones.
    return ring.entries()


def _ring_with(*stores: str) -> ReadyRing:
    """A ring where `stores` have all been served once, in order, and turn ended."""
    ring = ReadyRing(stores)
    assert ring.take(len(stores)) == list(stores)
    return ring


def test_empty_ring() -> None:
    ring = ReadyRing()
    assert len(ring) == 0
    assert len(ring) == 0
    assert ring.take(5) == []
    assert ring.snapshot() == []


def test_take_zero_or_negative_takes_nothing() -> None:
    ring = ReadyRing(["a"])
    assert ring.take(0) == []
    assert ring.take(-1) == []
    assert ring.snapshot() == ["a"]


def test_fresh_stores_are_fifo() -> None:
    ring = ReadyRing()
    for store in ["c", "a", "b"]:
        ring.notify(store)
    assert ring.take(1) == ["c"]
    assert ring.take(10) == ["a", "b", "c"]


def test_new_store_served_before_round_robin() -> None:
    ring = _ring_with("a", "b", "c")
    ring.notify("new")
    assert ring.take(1) == ["new"]
    assert ring.take(3) == ["a", "b", "c"]


def test_new_store_jumps_ahead_mid_turn() -> None:
    ring = _ring_with("a", "b", "c", "d")
    assert ring.take(1) == ["a"]
    ring.notify("new")
    assert ring.take(2) == ["new", "b"]


def test_notify_of_present_store_is_noop() -> None:
    ring = _ring_with("a", "b", "c")
    ring.notify("c")
    ring.notify("a")
    assert ring.snapshot() == ["a", "b", "c"]
    assert len(ring) == 3
    assert _entries(ring) == 3


def test_round_robin_order() -> None:
    ring = ReadyRing(["a", "b", "c"])
    served = [s for _ in range(6) for s in ring.take(2)]
    assert served == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c"]


def test_take_returns_distinct_stores() -> None:
    ring = ReadyRing(["a", "b", "c"])
    assert ring.take(10) == ["a", "b", "c"]
    assert ring.take(10) == ["a", "b", "c"]
    ring.notify("d")
    assert ring.take(10) == ["d", "a", "b", "c"]


def test_taken_store_moves_to_tail_and_stays() -> None:
    ring = ReadyRing(["a", "b", "c"])
    assert ring.take(1) == ["a"]
    assert "a" in ring
    assert ring.snapshot() == ["b", "c", "a"]


def test_drop_removes_until_next_notify() -> None:
    ring = ReadyRing(["a", "b", "c"])
    assert ring.take(1) == ["a"]
    ring.drop("a")  # short claim
    assert "a" not in ring
    assert len(ring) == 2
    assert ring.take(10) == ["b", "c"]
    assert ring.take(10) == ["b", "c"]


def test_drop_unknown_store_is_noop() -> None:
    ring = ReadyRing(["a"])
    ring.drop("zzz")
    ring.drop("zzz")
    assert ring.snapshot() == ["a"]


def test_dropped_store_renotified_same_turn_goes_to_tail() -> None:
    ring = _ring_with("a", "b", "c", "d")  # turn 2 starts with the next take
    assert ring.take(1) == ["a"]
    ring.drop("a")
    ring.notify("a")  # new work, but "a" already had its turn
    assert ring.snapshot() == ["b", "c", "d", "a"]
    assert ring.take(1) == ["b"]
    assert ring.take(3) == ["c", "d", "a"]


def test_dropped_store_renotified_same_turn_is_behind_fresh_and_waiting() -> None:
    ring = _ring_with("a", "b")
    assert ring.take(1) == ["a"]
    ring.drop("a")
    ring.notify("a")
    ring.notify("x")  # genuinely fresh: goes first
    assert ring.take(3) == ["x", "b", "a"]


def test_store_renotified_after_its_turn_is_fresh_again() -> None:
    ring = _ring_with("a", "b", "c")
    assert ring.take(1) == ["a"]
    ring.drop("a")
    assert ring.take(2) == ["b", "c"]
    # Head "b" was served this turn: the next take starts a new turn.
    assert ring.take(1) == ["b"]
    ring.notify("a")
    assert ring.take(1) == ["a"]  # fresh in the new turn: served before "c"
    assert ring.take(2) == ["c", "b"]


def test_empty_ring_ends_turn() -> None:
    ring = ReadyRing(["a", "b"])
    assert ring.take(2) == ["a", "b"]
    ring.drop("a")
    ring.drop("b")
    assert len(ring) == 0
    ring.notify("b")
    ring.notify("a")
    assert ring.take(2) == ["b", "a"]


def test_thousand_stores_each_served_once_per_turn() -> None:
    stores = [f"store-{i:04d}" for i in range(1000)]
    ring = ReadyRing(stores)
    for _turn in range(5):
        served: list[str] = []
        for _ in range(10):
            batch = ring.take(100)
            assert len(batch) == 100
            assert len(set(batch)) == 100
            served.extend(batch)
        assert sorted(served) == stores  # every store exactly once this turn
        assert served == stores  # and in stable round-robin order


def test_thousand_stores_with_mid_turn_newcomer() -> None:
    stores = [f"s{i}" for i in range(1000)]
    ring = _ring_with(*stores)  # past the first turn, where all 1,000 were fresh
    ring.take(100)
    ring.notify("newcomer")
    assert ring.take(100)[0] == "newcomer"
    counts = Counter(s for _ in range(20) for s in ring.take(100))
    # 2,000 slots over 1,001 stores: nobody served more than twice, nobody starved.
    assert max(counts.values()) <= 2
    assert set(counts) == {*stores, "newcomer"}


def test_replace_all_keeps_order_and_adds_missing() -> None:
    ring = _ring_with("a", "b", "c")
    assert ring.take(2) == ["a", "b"]  # turn 2
    ring.drop("a")
    ring.replace_all(["a", "x", "c", "y", "x"])
    # Found by a scan: backlog, not arrivals, so all join the tail in input order.
    assert ring.snapshot() == ["c", "b", "a", "x", "y"]
    assert len(ring) == 5


def test_a_rebuilt_backlog_does_not_delay_a_store_that_arrives_next() -> None:
    ring = ReadyRing()
    ring.rebuild([f"backlog-{n}" for n in range(1000)])
    assert ring.take(1) == ["backlog-0"]
    ring.notify("newcomer")
    assert ring.take(1) == ["newcomer"]
    served = ring.take(999)
    assert served == [f"backlog-{n}" for n in range(1, 1000)]


def test_rebuild_does_not_remove_absent_stores() -> None:
    ring = ReadyRing(["a", "b"])
    ring.rebuild(["b"])
    assert ring.snapshot() == ["a", "b"]


def test_bounded_memory_notify_spam() -> None:
    stores = [f"s{i}" for i in range(10)]
    ring = ReadyRing()
    for i in range(1_000_000):
        ring.notify(stores[i % 10])
    assert len(ring) == 10
    assert _entries(ring) == 10
    assert len(ring._owed) <= 10


def test_bounded_memory_drop_renotify_churn() -> None:
    stores = [f"s{i}" for i in range(10)]
    ring = ReadyRing(stores)
    rng = random.Random(7)
    for _ in range(200_000):
        store = rng.choice(stores)
        ring.take(rng.randint(0, 3))
        ring.drop(store)
        ring.notify(store)
        assert _entries(ring) <= 2 * len(ring) + 1
    assert len(ring._live) == 10
    assert len(ring._owed) <= 10


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(12345)
    stores = [f"s{i}" for i in range(30)]
    ring = ReadyRing()
    model: set[str] = set()
    for _ in range(20_000):
        op = rng.random()
        if op < 0.4:
            store = rng.choice(stores)
            ring.notify(store)
            model.add(store)
        elif op < 0.65:
            store = rng.choice(stores)
            ring.drop(store)
            model.discard(store)
        elif op < 0.97:
            n = rng.randint(0, 8)
            before = ring.snapshot()
            batch = ring.take(n)
            assert len(batch) == len(set(batch)) == min(n, len(before))
            assert set(batch) <= model
        else:
            sample = rng.sample(stores, rng.randint(0, 10))
            ring.rebuild(sample)
            model.update(sample)
        snapshot = ring.snapshot()
        assert len(snapshot) == len(set(snapshot)) == len(ring)
        assert set(snapshot) == model
        assert all(s in ring for s in model)
        assert (len(ring) == 0) == (not model)
        assert _entries(ring) <= 2 * len(ring) + 1


def test_random_operations_fairness_each_store_once_per_turn() -> None:
    """With a stable set of busy stores plus churners, nobody is served twice
    while another continuously present store waits a whole turn."""
    rng = random.Random(99)
    busy = [f"busy{i}" for i in range(20)]
    churn = [f"churn{i}" for i in range(5)]
    ring = ReadyRing(busy)
    last_served: dict[str, int] = {}
    for step in range(5_000):
        store = rng.choice(churn)
        if rng.random() < 0.5:
            ring.drop(store)
        else:
            ring.notify(store)
        for s in ring.take(rng.randint(1, 4)):
            last_served[s] = step
        # Between two services of a busy store (never dropped) every other store is
        # served at most twice (end of one turn + start of the next).
        for s in busy:
            assert step - last_served.get(s, 0) <= 2 * (len(busy) + len(churn))


def test_initial_stores_are_backlog_and_a_newcomer_goes_first() -> None:
    # Stores loaded at start-up are backlog: a store that notifies later is served next,
    # then joins the round robin behind them.
    ring = ReadyRing(["a", "b", "c"])
    assert ring.take(1) == ["a"]
    ring.notify("x")
    assert ring.take(3) == ["x", "b", "c"]
    assert ring.take(4) == ["a", "x", "b", "c"]


def test_drop_after_turn_rolled_over_makes_store_fresh() -> None:
    # Race: "c" was taken late in turn 1, another take started turn 2, then the
    # short claim for "c" comes back. "c" has not been served in turn 2, so a
    # notify makes it fresh: still at most once per turn.
    ring = ReadyRing(["a", "b", "c"])
    assert ring.take(3) == ["a", "b", "c"]
    assert ring.take(1) == ["a"]  # turn 2
    ring.drop("c")
    ring.notify("c")
    assert ring.take(3) == ["c", "b", "a"]


# -- weighted turns ----------------------------------------------------------------------


def _weighted(weights: dict[str, int]) -> ReadyRing:
    return ReadyRing(weights, weight_of=lambda store: weights.get(store, 1))


def test_weights_share_the_turns_in_proportion_and_interleave() -> None:
    ring = _weighted({"a": 1, "b": 2, "c": 4})
    served = [store for _ in range(700) for store in ring.take(1)]
    counts = Counter(served)
    assert counts == {"a": 100, "b": 200, "c": 400}
    # Smooth, not in runs: the heaviest store never goes more than one take without a turn.
    assert "c c c" not in " ".join(served) and "a a" not in " ".join(served)


def test_weights_one_one_two_two_four_four_eight_eight() -> None:
    weights = {f"s{i}": w for i, w in enumerate([1, 1, 2, 2, 4, 4, 8, 8])}
    ring = _weighted(weights)
    counts = Counter(store for _ in range(3000) for store in ring.take(1))
    for store, weight in weights.items():
        assert abs(counts[store] - 3000 * weight / 30) <= 1


def test_a_store_that_runs_dry_leaves_its_share_to_the_others_at_once() -> None:
    weights = {"heavy": 8, "a": 1, "b": 1}
    ring = _weighted(weights)
    for _ in range(100):
        ring.take(1)
    ring.drop("heavy")
    served = Counter(store for _ in range(100) for store in ring.take(1))
    assert served == {"a": 50, "b": 50}  # work-conserving: no slot waits for "heavy"


def test_a_heavy_store_back_from_a_short_claim_does_not_jump_the_queue() -> None:
    weights = {"heavy": 4, "a": 1, "b": 1}
    ring = _weighted(weights)
    taken = [store for _ in range(60) for store in ring.take(1)]
    assert Counter(taken) == {"heavy": 40, "a": 10, "b": 10}
    # A drop and a notify right away: heavy keeps its pass, it is not fresh again.
    ring.drop("heavy")
    ring.notify("heavy")
    counts = Counter(store for _ in range(60) for store in ring.take(1))
    assert counts == {"heavy": 40, "a": 10, "b": 10}


def test_a_new_store_goes_first_whatever_the_weights() -> None:
    ring = _weighted({"big": 1000, "small": 1})
    for _ in range(50):
        ring.take(1)
    ring.notify("newcomer")
    assert ring.take(1) == ["newcomer"]


def test_a_weight_change_acts_from_the_next_turn() -> None:
    weights = {"a": 1, "b": 1}
    ring = _weighted(weights)
    for _ in range(10):
        ring.take(1)
    weights["b"] = 3
    counts = Counter(store for _ in range(400) for store in ring.take(1))
    assert abs(counts["b"] - 300) <= 2 and abs(counts["a"] - 100) <= 2


def test_take_of_several_stops_at_a_heavy_store_s_next_turn() -> None:
    # Distinct stores, in pass order: heavy's next turns come before a's, so a take of two
    # stops at heavy instead of handing a a turn out of order (which would undo the weights).
    ring = _weighted({"heavy": 10, "a": 1})
    assert ring.take(2) == ["heavy"]
    counts = Counter(store for _ in range(109) for store in ring.take(2))
    assert abs(counts["heavy"] - 10 * counts["a"]) <= 10


# -- a fleet in step ---------------------------------------------------------------------


def test_a_store_served_elsewhere_moves_on_here_too() -> None:
    ring = _ring_with("a", "b", "c")
    ring.advance("a")  # another process took a's turn
    assert ring.take(3) == ["b", "c", "a"]


def test_a_served_notification_with_other_digits_is_ignored() -> None:
    # "²".isdigit() is true and int("²") raises: the payload is not one of ours.
    dispatcher = new_dispatcher(None, clock=lambda: 0.0)
    dispatcher.ring.notify("store-a")
    dispatcher.served_elsewhere("other\x1fstore-a\x1f²")  # raised ValueError
    assert dispatcher.ring.take(1) == ["store-a"]


def test_a_fresh_store_served_elsewhere_is_no_longer_new_here() -> None:
    ring = _ring_with("a", "b")
    ring.notify("new")
    ring.advance("new")  # another process served it first
    assert ring.take(3) == ["a", "b", "new"]


def test_two_rings_that_hear_of_each_other_s_turns_go_round_as_one() -> None:
    # Two processes taking slots in turn, each telling the other what it served: together they
    # serve each store once per round of 10 slots, as one ring would, not twice at random.
    stores = [f"s{n}" for n in range(10)]
    rings = [ReadyRing(stores), ReadyRing(list(reversed(stores)))]
    served: list[str] = []
    for slot in range(100):
        mine, other = rings[slot % 2], rings[(slot + 1) % 2]
        (store,) = mine.take(1)
        other.advance(store)
        served.append(store)
    for start in range(10, 100, 10):
        assert sorted(served[start : start + 10]) == stores, served[start : start + 10]


def test_advance_of_an_unknown_store_is_ignored_and_memory_stays_bounded() -> None:
    ring = ReadyRing(["a", "b"])
    ring.advance("zzz")
    for _ in range(10_000):
        ring.advance("a")
    assert ring.snapshot() == ["b", "a"]
    assert _entries(ring) <= 2 * len(ring) + 1


def test_a_refused_turn_is_given_back() -> None:
    weights = {"capped": 4, "a": 1, "b": 1}
    ring = _weighted(weights)
    taken = [store for _ in range(12) for store in ring.take(1)]
    assert Counter(taken) == {"capped": 8, "a": 2, "b": 2}
    # Its next turn is refused (over its cap): refunded and dropped, then back when due.
    assert ring.take(1) == ["capped"]
    ring.refund("capped")
    ring.drop("capped")
    ring.notify("capped")
    counts = Counter(store for _ in range(12) for store in ring.take(1))
    assert counts == {"capped": 8, "a": 2, "b": 2}  # not pushed behind for the refusal


# -- items, not turns (issue 25, weakness 7) ---------------------------------------------


def _claims(
    weights: dict[str, int], wanted: int, max_per_store: int, claims: int = 3000
) -> dict[str, float]:
    """The dispatcher's loop (`_claim_once`) against stores that never run dry: take the stores,
    share `wanted` between them within the cap (the extras moving one store on each claim), and
    charge each store for the items it got. Each store's share of the items, in %."""
    ring = _weighted(weights)
    got: Counter[str] = Counter()
    for turn in range(claims):
        stores = ring.take(min(wanted, len(ring)))
        quotas = split_quota(stores, wanted, max_per_store)
        shift = turn % len(quotas)
        quotas = quotas[len(quotas) - shift :] + quotas[: len(quotas) - shift]
        for store, quota in zip(stores, quotas, strict=True):
            got[store] += quota
            ring.charge(store, quota)
    total = sum(got.values())
    return {store: 100 * got[store] / total for store in weights}


@pytest.mark.parametrize(
    ("wanted", "max_per_store"),
    [(1, 20), (5, 20), (10, 20), (64, 20), (32, 5), (3, 1)],
    ids=["1-item", "5-item", "10-item", "64-item", "capped-at-5", "capped-at-1"],
)
@pytest.mark.parametrize(
    "weights", [{"a": 4, "b": 1}, {"a": 8, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 4}]
)
def test_weights_share_the_items_whatever_a_claim_holds(
    weights: dict[str, int], wanted: int, max_per_store: int
) -> None:
    # Charged one per turn, claims of 5 items gave 4:1 90/10 % and 8:1:1 91.7/4.2/4.2 %: the
    # heavy store's turns came in claims of its own, each worth 5 items, the others' shared.
    shares = _claims(weights, wanted, max_per_store)
    total = sum(weights.values())
    for store, weight in weights.items():
        assert abs(shares[store] - 100 * weight / total) <= 3, shares


def test_a_turn_pays_for_each_item_it_brought() -> None:
    ring = _weighted({"a": 1, "b": 1})
    assert ring.take(1) == ["a"]
    ring.charge("a", 3)  # a claim of 3 items: a's next turn comes after 3 of b's
    assert [store for _ in range(4) for store in ring.take(1)] == ["b", "b", "b", "a"]
