"""17. /health under a flood beside a working worker: leases lost and the answers' latency.

`/health` is open to anyone. One worker process (`python -m listener worker`, serving HTTP on
PORT, as on a platform) works through a backlog against the stub with a small pool
(DB_POOL_MAX=2) and short leases (LEASE_SECONDS=6: a renewal every 2 s, three missed ones and the
reaper takes the items back), while this process sends GET /health at a fixed rate (1,000 a
second for 30 s; open loop: each request is due at its time whatever the answers do, and its
latency counts from then) over 32 keep-alive connections.

Reported: requests sent and answered by status, latency p50 / p99 / max, and the leases the worker
lost meanwhile (items its reaper took back, outcomes refused as superseded: both must stay 0),
with items completed. `--baseline DIR` runs the same against another version's `listener`
package (e.g. before /health stopped querying the worker's pool), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    add_backlog,
    console,
    markdown_table,
    new_figure,
    publish,
    save_figure,
    scratch_database,
    stop_processes,
    stub_process,
    summary,
    table,
    timed,
    wait_workers_ready,
)

NAME = "health_flood"
CONNECTIONS = 32
STORES = 20
ITEMS_PER_STORE = 250
WORKER_ENV = {
    "DB_POOL_MAX": "2",
    "DB_POOL_MIN": "2",
    "LEASE_SECONDS": "6",
    "DB_LOCK_TIMEOUT_SECONDS": "1",
    "WORKER_CONCURRENCY": "16",
    "RATE_LIMIT_RPM": "0",
    "RATE_LIMIT_TPM": "0",
    "HTTP_HOST": "127.0.0.1",
    "LOG_LEVEL": "WARNING",
}
REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: health-flood\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_process(
    url: str, base_url: str, port: int, source: str | None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **WORKER_ENV, "DATABASE_URL": url, "PORT": str(port)}
    env |= {"OPENAI_API_KEY": "bench-key", "OPENAI_BASE_URL": base_url}
    # `python -m` puts the working directory first on sys.path: run in `source` for its package.
    return subprocess.Popen(
        [sys.executable, "-m", "listener", "worker"],
        env=env,
        cwd=source or ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def flood(port: int, rate: int, seconds: float) -> dict[str, Any]:
    if rate == 0:  # the control: the same window without a request
        await asyncio.sleep(seconds)
        return {"sent": 0, "answered": 0, "statuses": {}, "elapsed": seconds, "latency": None}
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (at := await due.get()) is not None:
                try:
                    writer.write(REQUEST)
                    status = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                    statuses[type(error).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - at)
                statuses[str(status)] += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection()) for _ in range(CONNECTIONS)]
    started = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        at = started + n / rate
        delay = at - time.perf_counter()
        if delay > 0.002:  # in steps of a few ms: one timer per request would cost more
            await asyncio.sleep(delay)
        due.put_nowait(at)
    for _ in tasks:
        due.put_nowait(None)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return {
        "sent": total,
        "answered": len(latencies),
        "statuses": dict(statuses),
        "elapsed": elapsed,
        "latency": summary(latencies),
    }


def worker_counts(url: str, pid: int, after: float) -> dict[str, int]:
    """The worker's counters from its heartbeat row, once a beat written after `after` landed."""
    import psycopg

    deadline = time.monotonic() + 30
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT extract(epoch FROM seen_at), stats FROM worker_heartbeats WHERE pid = %s",
                (pid,),
            ).fetchone()
            if row is not None and float(row[0]) > after:
                stats = row[1]
                return {k: int(stats.get(k, 0)) for k in ("reaped", "superseded", "completed")}
            if time.monotonic() > deadline:
                raise RuntimeError("the worker wrote no heartbeat after the flood")
            time.sleep(0.2)


def completed(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM job_items WHERE status = 'COMPLETED'").fetchone()
    return int(row[0]) if row else 0


def one_run(label: str, rate: int, seconds: float, source: str | None) -> dict[str, Any]:
    with scratch_database(NAME) as url, stub_process(latency=0.3) as stub:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            add_backlog(conn, [f"store-{n:02}" for n in range(STORES)], ITEMS_PER_STORE)
        port = free_port()
        proc = worker_process(url, stub.base_url, port, source)
        try:
            wait_workers_ready(url, [proc])
            before = completed(url)
            result = asyncio.run(flood(port, rate, seconds))
            result["completed_during"] = completed(url) - before
            result |= worker_counts(url, proc.pid, time.time())
        finally:
            stop_processes([proc])
    result["label"] = label
    result["leases_lost"] = result["reaped"] + result["superseded"]
    return result


def run(quick: bool, baseline: str | None = None) -> dict[str, Any]:
    rate, seconds = (1000, 10.0) if quick else (1000, 30.0)
    runs = [
        one_run("listener, no request (control)", 0, seconds, None),
        one_run("listener", rate, seconds, None),
    ]
    if baseline:
        runs.append(one_run("listener BEFORE", rate, seconds, baseline))
    return {"quick": quick, "rate": rate, "seconds": seconds, "runs": runs}


HEADERS = [
    "worker",
    "sent",
    "answered (by status)",
    "p50",
    "p99",
    "max",
    "leases lost",
    "items/s in the window",
]


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["runs"]:
        by_status = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["statuses"].items()))
        lat = r["latency"]
        times = [f"{lat[q] * 1000:.1f} ms" for q in ("p50", "p99", "max")] if lat else ["—"] * 3
        out.append(
            [
                r["label"],
                f"{r['sent']:,}",
                f"{r['answered']:,} ({by_status})" if r["sent"] else "—",
                *times,
                f"{r['leases_lost']} ({r['reaped']} reaped, {r['superseded']} superseded)",
                f"{r['completed_during'] / r['elapsed']:.1f}",
            ]
        )
    return out


def report(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, rows(result))


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure(7, 3)
    flooded = [r for r in result["runs"] if r["latency"]]
    labels = [r["label"] for r in flooded]
    values = [r["latency"]["p99"] * 1000 for r in flooded]
    bars = ax.barh(labels, values)
    ax.bar_label(
        bars,
        labels=[
            f"{v:.1f} ms, {r['leases_lost']} leases lost"
            for v, r in zip(values, flooded, strict=True)
        ],
        fontsize=8,
    )
    ax.set_xlabel(f"GET /health p99 at {result['rate']:,}/s for {result['seconds']:.0f} s (ms)")
    save_figure(fig, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 s instead of 30")
    parser.add_argument("--baseline", help="a directory holding another version's listener")
    args = parser.parse_args()
    if args.baseline and not (Path(args.baseline) / "listener").is_dir():
        parser.error(f"{args.baseline}/listener is not a directory")
    result = publish(NAME, timed(lambda quick: run(quick, args.baseline), args.quick), report, plot)
    console.print(table("/health flood beside a worker", HEADERS, rows(result)))


if __name__ == "__main__":
    main()
