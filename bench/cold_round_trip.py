"""16. The machine's floor under the idle pickup: one `SELECT 1` round trip to PostgreSQL after
50 to 200 ms of quiet (as an idle worker's claim is sent) against the same right after another.

Nothing of the project runs: the difference is what waking an idle process and its core costs on
this machine, paid by every step of a pickup that crosses a process (the notification to the
listening session and on to the worker, the claim to its session and back).
"""

from __future__ import annotations

import random
import time
from typing import Any

import psycopg

from bench.common import (
    ADMIN_URL,
    console,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    save_figure,
    summary,
    table,
    timed,
)

NAME = "cold_round_trip"


def run(quick: bool) -> dict[str, Any]:
    samples = 100 if quick else 400
    cold, warm = [], []
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT 1")
        for _ in range(samples):
            time.sleep(random.uniform(0.05, 0.2))
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            warm.append(time.perf_counter() - started)
    return {"quick": quick, "samples": samples, "cold": summary(cold), "warm": summary(warm)}


HEADERS = ["SELECT 1 round trip", "p50", "p99"]


def rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [label, f"{result[key]['p50'] * 1000:.3f} ms", f"{result[key]['p99'] * 1000:.3f} ms"]
        for label, key in (("after 50 to 200 ms of quiet", "cold"), ("right after another", "warm"))
    ]


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result))


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(6, 3)
    values = [result[key]["p50"] * 1000 for key in ("cold", "warm")]
    bars = ax.barh(["after quiet", "right after"], values)
    ax.bar_label(bars, fmt="{:.3f} ms", fontsize=8)
    ax.set_xlabel("SELECT 1 round trip, p50 (ms)")
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    result = publish(NAME, timed(run, args.quick), report, plot)
    console.print(table("the machine's cold round trip", HEADERS, rows(result)))


if __name__ == "__main__":
    main()
