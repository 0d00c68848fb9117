"""What the dashboard's templates draw, computed apart from any I/O: the stores' page of the table,
the throughput chart's bars, a job's progress bar, and human figures.

Pure: a snapshot (or plain numbers) in, plain values out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from listener.http.figures import StoreRow, Stores

PAGE_SIZE = 50
SORTS = ("backlog", "in_flight", "last_minute", "oldest", "store")
STATUS_ORDER = ("COMPLETED", "FAILED", "CANCELLED", "PROCESSING", "PENDING")


@dataclass(frozen=True)
class StorePage:
    rows: list[StoreRow]
    matching: int
    page: int
    pages: int
    sort: str
    query: str


def store_page(stores: Stores, query: str, page: int, sort: str) -> StorePage:
    """One page of the stores matching `query` (a substring of the store id, any case); rows
    are built for that page only."""
    sort = sort if sort in SORTS else "backlog"
    needle = query.strip().casefold()
    matching = [s for s in stores.order if needle in s.casefold()] if needle else stores.order
    if sort != "backlog":  # the snapshot keeps them by backlog already
        matching = sorted(matching, key=stores.sort_key(sort))
    pages = max(1, math.ceil(len(matching) / PAGE_SIZE))
    page = min(max(1, page), pages)
    start = (page - 1) * PAGE_SIZE
    rows = [stores.row(s) for s in matching[start : start + PAGE_SIZE]]
    return StorePage(rows, len(matching), page, pages, sort, query)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    label: str


CHART_WIDTH = 600.0
CHART_HEIGHT = 120.0


def chart_bars(per_minute: list[int], now: datetime) -> tuple[list[Bar], int]:
    """Bars of finished items per minute (oldest left) and the scale's top value."""
    top = max([*per_minute, 1])
    # A round scale: 1, 2 or 5 times a power of ten.
    magnitude = 10 ** math.floor(math.log10(top))
    scale = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= top)
    slot = CHART_WIDTH / max(1, len(per_minute))
    bars = []
    for index, value in enumerate(per_minute):
        height = CHART_HEIGHT * value / scale
        minutes_ago = len(per_minute) - 1 - index
        label = "this minute" if minutes_ago == 0 else f"{minutes_ago} min ago"
        bars.append(
            Bar(
                x=index * slot + 1,
                y=CHART_HEIGHT - height,
                width=slot - 2,
                height=height,
                value=value,
                label=label,
            )
        )
    return bars, scale


@dataclass(frozen=True)
class Segment:
    status: str
    x: float
    width: float
    count: int


def progress_segments(counts: dict[str, int], width: float = 100.0) -> list[Segment]:
    """A job's stacked bar: one segment per status with items, in STATUS_ORDER."""
    total = sum(counts.values())
    segments = []
    x = 0.0
    for status in STATUS_ORDER:
        count = counts.get(status, 0)
        if count and total:
            share = width * count / total
            segments.append(Segment(status, x, share, count))
            x += share
    return segments


def age(seconds: float | None) -> str:
    """`45 s`, `12 min`, `3.5 h`, `2.0 d`; an em dash for nothing."""
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "—"
