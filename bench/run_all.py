"""Every benchmark in one run (`python -m bench.run_all [--quick]`), then
`bench/results/summary.md`: each benchmark's table, its plot, and how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench import budget, capacity, claim_cost, enqueue, many_stores, retention, start_latency
from bench.common import RESULTS, console, parse_args

BENCHMARKS: list[tuple[str, str, Callable[[bool], dict[str, Any]]]] = [
    ("claim_cost", "1. Claim cost against the backlog", claim_cost.main),
    ("start_latency", "2. Store start latency", start_latency.main),
    ("budget", "3. The budget, end to end", budget.main),
    ("capacity", "4. Raw capacity", capacity.main),
    ("many_stores", "5. Many stores", many_stores.main),
    ("enqueue", "6. Enqueue throughput", enqueue.main),
    ("retention", "7. Claims while pruning", retention.main),
]


def main() -> None:
    quick = parse_args(__doc__).quick
    began = time.monotonic()
    mode = "quick" if quick else "full"
    sections = []
    for name, title, run in BENCHMARKS:
        console.rule(title)
        started = time.monotonic()
        result = run(quick)
        took = time.monotonic() - started
        note = f" {result['note']}." if result.get("note") else ""
        sections.append(
            f"## {title}\n\n{result['markdown']}\n![{name}]({name}.png)\n\n"
            f"_{mode} run, {took:.0f} s.{note}_\n"
        )
    total = time.monotonic() - began
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Benchmark results\n\n`python -m bench.run_all{' --quick' if quick else ''}`, "
        f"{stamp}, {total / 60:.1f} min on this machine (2 cores, PostgreSQL 15).\n"
    )
    path = RESULTS / "summary.md"
    path.write_text("\n".join([header, *sections]), encoding="utf-8")
    console.rule(f"all benchmarks: {total:.0f} s; wrote {path.name}")


if __name__ == "__main__":
    main()
