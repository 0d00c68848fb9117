"""What `listener demo` shows, drawn with rich: the live table (or, headless, a status line),
the summary at the end, and the log lines above them.

Everything here only reads the `Demo`: the figures are gathered in run.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from listener import redact
from listener.costs import StoreCost, fleet_total, money
from listener.demo.store import Store
from listener.openai.prices import PriceTable

if TYPE_CHECKING:
    import argparse

    from listener.worker import Worker


class Demo(Protocol):
    """What the view reads of a run (`run.Demo`); the view never changes it."""

    args: argparse.Namespace
    console: Console
    stores: list[Store]
    worker: Worker
    budget: int
    costs: dict[str, StoreCost] | None
    prices: PriceTable | None

    def elapsed(self) -> float: ...

    def done(self) -> int: ...


LIVE_COLUMNS = "store,kind,arrives,products,progress,done,in flight,first item after,finished in"
SUMMARY_COLUMNS = "store,kind,tier,products,completed,failed,first item after,finished,cost,saved"


@contextmanager
def logs_through(console: Console, verbose: bool) -> Iterator[None]:
    """Log lines go through rich, above the live view; only warnings unless --verbose."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [RichHandler(console=console, show_path=False, markup=False)]
    redact.install_filter(root.handlers)  # the handler it replaces had the filter
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.handlers, root.level = saved


@contextmanager
def live_view(demo: Demo) -> Iterator[Live | None]:
    """The live table, redrawn by the caller; None when headless."""
    if demo.args.headless:
        yield None
        return
    with Live(render_live(demo, None), console=demo.console, auto_refresh=False) as live:
        yield live


def limiter_text(demo: Demo) -> str:
    snap = demo.worker.limiter.snapshot()
    # Its window is a minute: before a minute has passed, the pace so far is what counts.
    window = min(60.0, max(1.0, demo.elapsed()))
    used = 100 * snap.requests_last_minute * 60 / window / snap.rpm if snap.rpm else 0.0
    return (
        f"limiter at {used:.0f}% of {snap.rpm:,}/min ({snap.requests_last_minute:,} granted "
        f"in the last minute), {snap.waiters} waiting for a slot, "
        f"{demo.worker.counters.rate_limited} 429s"
    )


def status_line(demo: Demo, rate: float | None) -> str:
    """The headless view: one line of progress."""
    total = sum(s.products for s in demo.stores if s.job_id is not None)
    started = sum(s.first_start is not None for s in demo.stores)
    return (
        f"{demo.done():,} of {total:,} done, {_rate(rate)} items/min, {started}/"
        f"{len(demo.stores)} stores started; {limiter_text(demo)}"
    )


def render_live(demo: Demo, rate: float | None) -> RenderableType:
    in_flight = Counter(demo.worker.running.values())
    table = _table(LIVE_COLUMNS, left=("store", "kind", "progress"), pad_edge=False)
    for s in demo.stores:
        arrives, products = f"t+{s.arrives_after:.1f} s", f"{s.products:,}"
        if s.job_id is None:
            waiting = Text("waiting to arrive", style="dim")
            table.add_row(Text(s.name, style="dim"), s.kind, arrives, products, waiting)
            continue
        table.add_row(
            s.name,
            s.kind,
            arrives,
            products,
            ProgressBar(total=s.products, completed=s.completed + s.failed, width=30),
            f"{s.completed:,}" + (f" ({s.failed} failed)" if s.failed else ""),
            str(in_flight.get(s.name, 0)),
            "…" if s.latency is None else duration_text(s.latency),
            "" if s.took is None else f"{s.took:.1f} s",
        )
    clock = f"t={demo.elapsed():.1f} s of {demo.args.seconds:g} s (Ctrl-C ends it early)"
    footer = f"{_rate(rate)} items/min now · {limiter_text(demo)}"
    return Group(Text(clock, style="bold"), table, Text(footer))


def render_summary(demo: Demo) -> RenderableType:
    table = _table(SUMMARY_COLUMNS, left=("store", "kind", "tier", "finished"), title="Summary")
    costs = demo.costs or {}
    for s in demo.stores:
        if s.job_id is None:
            table.add_row(s.name, s.kind, s.tier, f"{s.products:,}", "", "", "", "did not arrive")
            continue
        left = s.products - s.completed - s.failed
        cost = costs.get(s.name)
        table.add_row(
            s.name,
            s.kind,
            s.tier,
            f"{s.products:,}",
            f"{s.completed:,}",
            str(s.failed),
            "never started" if s.latency is None else duration_text(s.latency),
            f"no ({left:,} left)" if s.took is None else f"yes, in {s.took:.1f} s",
            "" if cost is None else money(cost.today),
            "" if cost is None else f"${cost.today.saved_usd:,.4f}",
        )
    arrived = [s for s in demo.stores if s.job_id is not None]
    latencies = [s.latency for s in arrived if s.latency is not None]
    notes = [f"{len(arrived)} of {len(demo.stores)} arrived before the end"]
    if len(arrived) == len(demo.stores):
        notes.clear()
    if latencies:
        notes.append(f"max first-item latency {max(latencies):.3f} s")
    every = "yes" if len(latencies) == len(arrived) else "no"
    seconds, done = max(demo.elapsed(), 0.001), demo.done()
    lines = [
        f"every store started: {every}" + (f" ({'; '.join(notes)})" if notes else ""),
        f"{done:,} items in {seconds:.1f} s = {done * 60 / seconds:,.0f} items/min "
        f"(budget {demo.budget:,}/min), {demo.worker.counters.rate_limited} 429s",
    ]
    if demo.costs is not None and demo.prices is not None:
        lines.append(cost_line(fleet_total(demo.costs.values()), demo.prices))
    return Group(table, Text("\n".join(lines), style="bold"))


def cost_line(total: StoreCost, prices: PriceTable) -> str:
    """What the run cost and what the batch and flex tiers saved against realtime."""
    period = total.today
    realtime = period.cost_usd + period.saved_usd
    share = f" ({100 * period.saved_usd / realtime:.0f}% of the realtime price)" if realtime else ""
    saved = ", ".join(
        f"{tier} ${period.tiers[tier].saved_usd:,.4f}"
        for tier in ("batch", "flex")
        if tier in period.tiers
    )
    return (
        f"cost {money(period)} at the prices of {prices.read_on.isoformat()}; saved "
        f"${period.saved_usd:,.4f} against realtime{share}" + (f": {saved}" if saved else "")
    )


def _table(columns: str, left: tuple[str, ...], **options: Any) -> Table:
    table = Table(box=box.SIMPLE_HEAD, **options)
    for header in columns.split(","):
        table.add_column(header, justify="left" if header in left else "right")
    return table


def duration_text(seconds: float) -> str:
    """Milliseconds under a second, seconds above."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _rate(rate: float | None) -> str:
    return "…" if rate is None else f"{rate:,.0f}"
