"""The ready ring: which stores (tenants) have claimable work, and whose turn it is.

Pure data structure: no I/O, no asyncio. A NOTIFY per store feeds `notify`; the
claimer asks `take(n)` for the next stores to claim from and calls `drop` when a
claim came back short.

Fairness model: weighted turns by stride scheduling. Each store in the ring has a
*pass*; `take` serves the store with the lowest pass (ties: first come, first served)
and moves its pass on by `STRIDE // weight`; once the claim is back, `charge` makes the
turn pay that stride for each item it brought (a claim can hold several). Over any
stretch during which a set of stores stays busy, each gets items in proportion to its
weight, smoothly interleaved (weights 1 and 2: a b b a b b, not a a b b b b), and with
equal weights this is plain round robin. `vtime`, the pass of the latest store served, is
where the ring is now.

A store that is not in the ring and is not owed a later pass is *fresh*: it is served
before everyone else (fresh stores among themselves first come, first served), so a new
store's first job does not wait behind everybody else's turn. A store that was served,
then dropped (its claim came back short) and notified again before the ring caught up
with its pass goes back at that pass instead: being "new" again must never be a way to
jump the queue, nor to get more than its weight. Stores found by a scan of the table
(start-up, a reconnect, the safety sweep) are backlog, not arrivals: they join one
stride behind `vtime`, as if served just now.

Layout. `_fresh`, a deque of `(store, token)`, and `_heap`, a heap of `(pass, token,
store)`; `_live` holds the token of each store's one live entry. `drop` just forgets
the token, leaving a tombstone (O(1) instead of removal from the middle); tombstones
are skipped when they reach the head and compacted away once they outnumber live
entries, so memory stays bounded by the number of distinct stores whatever the
notify/drop rate. `_passes` is each scheduled store's pass; `_owed` keeps the pass of
dropped stores still ahead of `vtime`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator

# A weight-1 store's pass moves this far per item; integers, so passes never drift apart
# through float rounding (weights go up to 1,000: the error is under one part in 10^9).
STRIDE = 10**12

_Fresh = tuple[str, int]
_Scheduled = tuple[int, int, str]


def _weight_one(_store: str) -> int:
    return 1


class ReadyRing:
    """Weighted turns between stores with work; fresh stores first. See module docstring."""

    def __init__(
        self, stores: Iterable[str] = (), weight_of: Callable[[str], int] = _weight_one
    ) -> None:
        self._weight_of = weight_of
        self._fresh: deque[_Fresh] = deque()
        self._heap: list[_Scheduled] = []
        self._live: dict[str, int] = {}
        self._passes: dict[str, int] = {}  # the pass of each live store in the heap
        self._owed: dict[str, int] = {}
        self._vtime = 0
        self._next_token = 0
        self.replace_all(stores)

    # -- feeding -----------------------------------------------------------------

    def notify(self, store: str) -> None:
        """The store has (maybe) new work; add it unless it is already in the ring."""
        if store in self._live:
            return
        owed = self._owed.pop(store, None)
        if owed is not None and owed > self._vtime:
            # Served recently: back at the pass it had, behind those it already overtook.
            self._schedule(store, owed)
        else:
            self._fresh.append((store, self._token_for(store)))

    def replace_all(self, stores: Iterable[str]) -> None:
        """Merge the full set of stores with pending work, e.g. after a (re)connect.

        Missing stores join one stride behind `vtime`, as if served just now: a scan finds
        backlog, not arrivals. Were they fresh, a worker starting on a database with 1,000
        stores of backlog would serve all 1,000 before a store that arrives a second later
        (only a notification makes a store fresh). Present ones keep their place. Stores
        absent from `stores` are deliberately NOT removed: the scan is a snapshot, and a
        NOTIFY for a job committed after it may already have been applied; removing the
        store would lose that wake-up until the next sweep. A stale entry costs one short
        claim, after which the claimer drops it.
        """
        for store in stores:
            if store in self._live:
                continue
            owed = self._owed.pop(store, 0)
            self._schedule(store, max(owed, self._vtime + self._stride(store)))

    rebuild = replace_all

    def drop(self, store: str) -> None:
        """The store's claim came back short: forget it until its next notify.

        It keeps its pass while the ring has not caught up with it, so a notify before then
        puts it back there rather than first. Unknown stores are ignored.
        """
        if self._live.pop(store, None) is None:
            return
        if not self._live:
            # Nobody is waiting, so the pass over the ring is over: start clean.
            # (Otherwise stale passes would outlive the turn they belong to.)
            self._fresh.clear()
            self._heap.clear()
            self._passes.clear()
            self._owed.clear()
            return
        pass_ = self._passes.pop(store, None)  # None: fresh, never served
        if pass_ is not None and pass_ > self._vtime:
            self._owed[store] = pass_
        if self._tombstones() > len(self._live):
            self._compact()

    # -- serving -----------------------------------------------------------------

    def take(self, n: int) -> list[str]:
        """The next up to `n` distinct stores to serve: fresh first, then lowest pass.

        Each moves on by its stride and stays in the ring.
        """
        taken: list[str] = []
        while len(taken) < n:
            fresh = self._pop_live_fresh()
            if fresh is not None:
                store = fresh[0]
                self._schedule(store, self._vtime + self._stride(store))
            else:
                scheduled = self._pop_live_scheduled()
                if scheduled is None:
                    break
                pass_, token, store = scheduled
                if store in taken:
                    # Its next turn comes before anyone else's: stay distinct, stop here,
                    # and leave it exactly where it was.
                    heapq.heappush(self._heap, scheduled)
                    self._live[store] = token
                    self._passes[store] = pass_
                    break
                self._vtime = max(self._vtime, pass_)
                self._schedule(store, pass_ + self._stride(store))
            taken.append(store)
        return taken

    def advance(self, store: str, count: int = 1) -> None:
        """Another process of the fleet served `store` `count` times: move it on as if this
        ring had, so that every process's turns stay in step (one fleet-wide round) instead of
        each process going round on its own. A fresh store served elsewhere is no longer new
        here; an unknown store is ignored."""
        if count <= 0:
            return
        step = count * self._stride(store)
        if store in self._passes:
            pass_ = self._passes[store]
            self._vtime = max(self._vtime, pass_)
            # Re-scheduled: the old heap entry becomes a tombstone.
            self._schedule(store, pass_ + step)
            if self._tombstones() > len(self._live):
                self._compact()
        elif store in self._live:
            # Fresh here, served elsewhere: it takes its place in the round like a served store.
            self._schedule(store, self._vtime + step)
            if self._tombstones() > len(self._live):
                self._compact()
        elif store in self._owed:
            self._owed[store] += step

    def charge(self, store: str, items: int) -> None:
        """The store's last turn (`take`) brought `items` items: it pays a stride for each, so
        that weights share items, not turns. `take` charged one; a turn of 5 items costs 5, and
        one that brought nothing (its claim was refused: paused, at a cap, or its items went to
        another process) is given back, so that refusals never count as service and the store
        is not pushed behind the others for them. (Charged one per turn, claims of 5 items gave
        weights 4:1 85/15 %: the heavier store's extra turns came in claims of its own.)"""
        step = (items - 1) * self._stride(store)
        if step == 0:
            return
        if store in self._passes:
            self._schedule(store, max(self._passes[store] + step, self._vtime))
            if self._tombstones() > len(self._live):
                self._compact()
        elif store in self._owed:
            self._owed[store] += step
            if self._owed[store] <= self._vtime:
                del self._owed[store]

    def refund(self, store: str) -> None:
        """The store's last turn brought nothing: `charge(store, 0)`."""
        self.charge(store, 0)

    # -- inspection --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, store: object) -> bool:
        return store in self._live

    def __iter__(self) -> Iterator[str]:
        """Live stores in the order `take` would serve them next (each once)."""
        for store, token in self._fresh:
            if self._live.get(store) == token:
                yield store
        for _pass, token, store in sorted(self._heap):
            if self._live.get(store) == token:
                yield store

    def snapshot(self) -> list[str]:
        """A copy of the ring in order of service, for stats and debugging."""
        return list(self)

    def entries(self) -> int:
        """Entries held, live or tombstones (memory is bounded: at most 2 x live + 1)."""
        return len(self._fresh) + len(self._heap)

    # -- internals ---------------------------------------------------------------

    def _stride(self, store: str) -> int:
        return STRIDE // max(1, self._weight_of(store))

    def _token_for(self, store: str) -> int:
        token = self._next_token
        self._next_token += 1
        self._live[store] = token
        return token

    def _schedule(self, store: str, pass_: int) -> None:
        heapq.heappush(self._heap, (pass_, self._token_for(store), store))
        self._passes[store] = pass_

    def _pop_live_fresh(self) -> _Fresh | None:
        while self._fresh:
            entry = self._fresh.popleft()
            if self._live.get(entry[0]) == entry[1]:
                self._live.pop(entry[0])
                return entry
        return None

    def _pop_live_scheduled(self) -> _Scheduled | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._live.get(entry[2]) == entry[1]:
                self._live.pop(entry[2])
                self._passes.pop(entry[2])
                return entry
        return None

    def _tombstones(self) -> int:
        # Every live store has exactly one entry in one of the two queues.
        return self.entries() - len(self._live)

    def _compact(self) -> None:
        # O(entries), but only once tombstones outnumber live entries, so each drop pays
        # O(1) amortised and entries never exceed 2 * live + 1. Debts the ring has caught
        # up with are forgotten here too.
        self._fresh = deque(e for e in self._fresh if self._live.get(e[0]) == e[1])
        self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
        heapq.heapify(self._heap)
        self._owed = {s: p for s, p in self._owed.items() if p > self._vtime}
