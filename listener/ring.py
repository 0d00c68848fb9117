"""The ready ring: which stores (tenants) have claimable work, and whose turn it is.

Pure data structure: no I/O, no asyncio. A NOTIFY per store feeds `notify`; the
claimer asks `take(n)` for the next stores to claim from and calls `drop` when a
claim came back short.

Fairness model. A *turn* is one pass over the ring: every store in it is served
at most once per turn. A store that is not in the ring and has not been served in
the current turn is *fresh*: it is served before the round robin (fresh stores
among themselves first come, first served), so a new store's first job does not
wait behind everybody else's turn. A store that was served in the current turn,
then dropped and notified again goes to the tail instead: being "new" again must
never be a way to jump the queue. Stores found by a scan of the table (start-up, a
reconnect, the safety sweep) are backlog, not arrivals: they join the round robin's tail.

Layout. Two deques of `(store, token)` entries, `_fresh` then `_round_robin`, and
`_live`, the token of each store's one live entry. `drop` just forgets the token,
leaving a tombstone in the deque (O(1) instead of O(n) removal from the middle);
tombstones are skipped when they reach the head and compacted away once they
outnumber live entries, so memory stays bounded by the number of distinct stores
whatever the notify/drop rate.

Invariant: `_round_robin` is [stores not yet served this turn] followed by
[stores served this turn], because only served stores are ever appended to it.
So the head being already served means the whole ring was served: new turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

_Entry = tuple[str, int]


class ReadyRing:
    """Round-robin set of stores with work; fresh stores first. See module docstring."""

    def __init__(self, stores: Iterable[str] = ()) -> None:
        self._fresh: deque[_Entry] = deque()
        self._round_robin: deque[_Entry] = deque()
        self._live: dict[str, int] = {}
        self._served_this_turn: set[str] = set()
        self._next_token = 0
        self.replace_all(stores)

    # -- feeding -----------------------------------------------------------------

    def notify(self, store: str) -> None:
        """The store has (maybe) new work; add it unless it is already in the ring."""
        if store in self._live:
            return
        token = self._next_token
        self._next_token += 1
        self._live[store] = token
        if store in self._served_this_turn:
            # Already had its turn: back of the line until the next turn.
            self._round_robin.append((store, token))
        else:
            self._fresh.append((store, token))

    def replace_all(self, stores: Iterable[str]) -> None:
        """Merge the full set of stores with pending work, e.g. after a (re)connect.

        Missing stores join the round robin at the tail, as if already served this turn:
        a scan finds backlog, not arrivals. Were they fresh, a worker starting on a
        database with 1,000 stores of backlog would serve all 1,000 before a store that
        arrives a second later (only a notification makes a store fresh). Present ones
        keep their place. Stores absent from `stores` are deliberately NOT removed: the
        scan is a snapshot, and a NOTIFY for a job committed after it may already have
        been applied; removing the store would lose that wake-up until the next sweep.
        A stale entry costs one short claim, after which the claimer drops it.
        """
        for store in stores:
            if store in self._live:
                continue
            token = self._next_token
            self._next_token += 1
            self._live[store] = token
            # Served-this-turn keeps the invariant: the round robin's tail is served stores.
            self._served_this_turn.add(store)
            self._round_robin.append((store, token))

    rebuild = replace_all

    def drop(self, store: str) -> None:
        """The store's claim came back short: forget it until its next notify.

        It stays marked as served this turn, so a notify before the turn ends puts
        it at the tail rather than first. Unknown stores are ignored.
        """
        if self._live.pop(store, None) is None:
            return
        if not self._live:
            # Nobody is waiting, so the pass over the ring is over: start clean.
            # (Otherwise stale served marks would outlive the turn they belong to.)
            self._fresh.clear()
            self._round_robin.clear()
            self._served_this_turn.clear()
        elif self._tombstones() > len(self._live):
            self._compact()

    # -- serving -----------------------------------------------------------------

    def take(self, n: int) -> list[str]:
        """The next up to `n` distinct stores to serve: fresh first, then round robin.

        Each is marked served this turn and moved to the tail (it stays in the ring).
        """
        taken: list[str] = []
        taken_set: set[str] = set()
        while len(taken) < n:
            entry = self._pop_live(self._fresh)
            if entry is None:
                entry = self._pop_live(self._round_robin)
                if entry is None:
                    break
                store = entry[0]
                if store in taken_set:
                    # Went all the way round within this call: stay distinct.
                    self._round_robin.appendleft(entry)
                    break
                if store in self._served_this_turn:
                    # Head already served => everyone was (see invariant): new turn.
                    self._served_this_turn.clear()
            store = entry[0]
            self._served_this_turn.add(store)
            self._round_robin.append(entry)
            taken.append(store)
            taken_set.add(store)
        return taken

    # -- inspection --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, store: object) -> bool:
        return store in self._live

    def is_empty(self) -> bool:
        return not self._live

    def __iter__(self) -> Iterator[str]:
        """Live stores in the order `take` would serve them (ignoring turn resets)."""
        for queue in (self._fresh, self._round_robin):
            for store, token in queue:
                if self._live.get(store) == token:
                    yield store

    def snapshot(self) -> list[str]:
        """A copy of the ring in order of service, for stats and debugging."""
        return list(self)

    # -- internals ---------------------------------------------------------------

    def _is_live(self, entry: _Entry) -> bool:
        return self._live.get(entry[0]) == entry[1]

    def _pop_live(self, queue: deque[_Entry]) -> _Entry | None:
        """Pop the first live entry, discarding the tombstones in front of it."""
        while queue:
            entry = queue.popleft()
            if self._is_live(entry):
                return entry
        return None

    def _tombstones(self) -> int:
        # Every live store has exactly one entry in one of the deques.
        return len(self._fresh) + len(self._round_robin) - len(self._live)

    def _compact(self) -> None:
        # O(entries), but only once tombstones outnumber live entries, so each drop
        # pays O(1) amortised and entries never exceed 2 * live + 1.
        self._fresh = deque(e for e in self._fresh if self._is_live(e))
        self._round_robin = deque(e for e in self._round_robin if self._is_live(e))
