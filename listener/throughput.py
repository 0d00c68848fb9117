"""Items finished per minute, by minute and by store: what a worker reports in its heartbeat so
the dashboard can draw the fleet's throughput without scanning finished rows (`job_items` has no
index on `completed_at`, and the history grows without bound).

Pure: the caller passes the time, wall-clock seconds (`time.time()`): minutes are whole minutes
of the epoch, so the dashboard can add up the minutes of workers that started at different times.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

MINUTES = 15
# The per-store window is kept in buckets of this many seconds: a store's "last minute" is at
# most one bucket stale, and memory is bounded by the stores active in the last minute.
BUCKET_SECONDS = 5.0
# A heartbeat carries at most this many stores (the busiest): at a real budget far fewer stores
# finish an item in one minute; with an instant handler the row stays small anyway.
TOP_STORES = 1000


@dataclass
class Throughput:
    """Finished items (completed or failed for good) counted per minute and per store."""

    minutes: deque[tuple[int, int]] = field(default_factory=deque)  # (minute index, count)
    buckets: deque[tuple[int, Counter[str]]] = field(default_factory=deque)

    def record(self, store: str, now: float, count: int = 1) -> None:
        minute = int(now // 60)
        if self.minutes and self.minutes[-1][0] == minute:
            index, total = self.minutes[-1]
            self.minutes[-1] = (index, total + count)
        else:
            self.minutes.append((minute, count))
        bucket = int(now // BUCKET_SECONDS)
        if not self.buckets or self.buckets[-1][0] != bucket:
            self.buckets.append((bucket, Counter()))
        self.buckets[-1][1][store] += count
        self._forget(now)

    def _forget(self, now: float) -> None:
        minute = int(now // 60)
        while self.minutes and self.minutes[0][0] <= minute - MINUTES:
            self.minutes.popleft()
        bucket = int(now // BUCKET_SECONDS)
        while self.buckets and self.buckets[0][0] <= bucket - 60 / BUCKET_SECONDS:
            self.buckets.popleft()

    def per_minute(self, now: float) -> dict[str, int]:
        """Items finished in each epoch minute of the last MINUTES (the current one still runs);
        keys are strings, as JSON will carry them."""
        self._forget(now)
        return {str(minute): count for minute, count in self.minutes}

    def last_minute(self, now: float) -> int:
        """Items finished in the last 60 s (to a bucket's precision)."""
        return sum(self.by_store(now, limit=None).values())

    def by_store(self, now: float, limit: int | None = TOP_STORES) -> dict[str, int]:
        """Items each store finished in the last 60 s, the busiest `limit` stores."""
        self._forget(now)
        counts: Counter[str] = Counter()
        for _bucket, stores in self.buckets:
            counts.update(stores)
        return dict(counts.most_common(limit))
