"""The bounded soak: `python -m bench.soak [--minutes 10]`. Not a test (pytest never collects it).

Two `python -m listener worker` processes run against the OpenAI stub (1,200 RPM, 0.2 s a call)
while a producer keeps submitting jobs for many stores, some items deliberately bad, and a fault
is injected every minute: a worker SIGKILLed, every database session cut, a 429 storm, a 5xx
burst, malformed answers, hung connections, an overlapping deploy. Every 5 s it samples each
worker's RSS, the connections to the soak database and the items by status. At the end the
producer stops, the workers drain the backlog and are stopped with SIGTERM, and the run checks
that nothing was lost or left open, that only the bad items FAILED (each with its reason), that
memory and connections stayed flat, and that completions resumed after every fault.

Writes bench/results/soak.json, soak.md (the report, a verdict per check) and soak.png; exits 1
when a check fails. The workers' logs stay in a temporary directory named in the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.progress import Progress

from bench.common import (
    RESULTS,
    StubProcess,
    console,
    progress,
    scratch_database,
    sql,
    status_counts,
    stub_process,
    write_json,
)
from bench.soak_faults import STORM_429S, Faults
from bench.soak_fleet import Fleet, Producer, soak_query
from bench.soak_output import markdown, plot
from bench.soak_report import analyse, scan_logs

NAME = "soak"
DATABASE = "listener_bench_soak"
STUB_RPM = 1200
STUB_LATENCY = 0.2
PROCESSES = 2
POOL_MAX = 4
SAMPLE_SECONDS = 5.0
# The workers' budget sits 5 % under the stub's, as one sets it under the account's real limit.
WORKER_ENV = {
    "RATE_LIMIT_RPM": "1140",
    "RATE_LIMIT_TPM": "0",
    "WORKER_CONCURRENCY": "16",
    "DB_POOL_MAX": str(POOL_MAX),
    "LEASE_SECONDS": "10",  # short, so a killed worker's items come back within the run
    "MAX_ATTEMPTS": "5",
    "OPENAI_TIMEOUT_SECONDS": "3",
    "SHUTDOWN_GRACE_SECONDS": "10",
    "LOG_LEVEL": "INFO",
}
HANG_SECONDS = 10.0  # longer than OPENAI_TIMEOUT_SECONDS: the client gives up, not the stub
STOP_TIMEOUT = 30.0  # the grace period plus time to write outcomes and close


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--drain-minutes", type=float, default=3.0, help="most time to drain")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.6 * int(WORKER_ENV["RATE_LIMIT_RPM"]) / 60,
        help="items a second the producer submits on average (default 60 %% of the budget)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--from-raw", type=Path, help="only redo the report from a run's raw.json (development)"
    )
    return parser.parse_args()


class Run:
    """One soak: the stub, the fleet, the producer, the faults, the samples, the event log."""

    def __init__(self, args: argparse.Namespace, url: str, stub: StubProcess, logs: Path) -> None:
        self.args = args
        self.url = url
        self.stub = stub
        self.fleet = Fleet(url, stub.base_url, WORKER_ENV, logs)
        self.producer = Producer(url, args.rate, args.seed)
        self.faults = Faults(self.fleet, stub, DATABASE, HANG_SECONDS, self.say)
        self.t0 = time.time()
        self.samples: list[dict[str, Any]] = []
        self.backlog: list[tuple[float, int, int]] = []  # (time, ready, processing) each second
        self._conn: psycopg.Connection[Any] | None = None
        self.log: list[tuple[float, str]] = []
        self.marks: dict[str, float] = {}
        self._last_completed = 0

    def say(self, line: str) -> None:
        now = time.time()
        self.log.append((now, line))
        console.print(f"[dim]{now - self.t0:7.1f} s[/dim]  {line}")

    def sample(self, phase: str) -> None:
        """RSS of every live worker, connections by application, items by status."""
        now = time.time()
        self.fleet.sample_rss(now)
        try:
            by_app = {str(app): int(n) for app, n in soak_query(self.url, "connections")}
            counts = status_counts(self.url)
        except psycopg.Error as error:
            self.say(f"sample skipped: {str(error).strip().splitlines()[0]}")
            return
        completed = counts.get("COMPLETED", 0)
        previous = self.samples[-1] if self.samples else None
        per_second = (completed - self._last_completed) / (now - previous["t"]) if previous else 0.0
        self._last_completed = completed
        self.samples.append(
            {
                "t": now,
                "phase": phase,
                "live_workers": len(self.fleet.live()),
                "worker_connections": sum(n for a, n in by_app.items() if a.startswith("listener")),
                "connections": by_app,
                "counts": counts,
                "completed_per_second": per_second,
            }
        )

    def sample_backlog(self) -> None:
        """Every second, on one connection of its own: the work waiting, to tell a slow fleet
        from one with nothing to do."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.url, autocommit=True, application_name="soak-harness"
                )
            row = self._conn.execute(sql("soak")["backlog"]).fetchone()
        except psycopg.Error:
            self._conn = None  # cut with the others by a db_restart: reconnect next second
            return
        if row is not None:
            self.backlog.append((time.time(), int(row[0]), int(row[1])))

    def watch(self) -> None:
        """Processes that exited unasked: noted loudly, and replaced so the soak goes on."""
        for life in self.fleet.poll():
            self.say(
                f"[red]worker slot {life.slot} pid {life.pid} exited by itself "
                f"with {life.exit_code}[/red] (log: {life.log_path})"
            )
            if self.fleet.current.get(life.slot) is life:
                self.fleet.spawn(life.slot)

    def loop_until(self, end: float, bar: Progress, task: Any, phase: str) -> None:
        next_sample = next_backlog = time.time()
        next_fault = self.t0 + self.args.fault_every
        last_fault_at = self.t0 + self.args.minutes * 60 - self.args.fault_every
        while (now := time.time()) < end:
            self.watch()
            self.faults.tick()
            if phase == "soak" and now >= next_fault and next_fault <= last_fault_at + 1:
                self.faults.inject()
                next_fault += self.args.fault_every
            if now >= next_backlog:
                self.sample_backlog()
                next_backlog += 1.0
            if now >= next_sample:
                self.sample(phase)
                next_sample += SAMPLE_SECONDS
                self._show(bar, task, phase)
            if phase == "drain" and self._drained():
                return
            time.sleep(0.2)

    def _drained(self) -> bool:
        last = self.samples[-1]["counts"] if self.samples else {}
        return not last.get("PENDING") and not last.get("PROCESSING")

    def _show(self, bar: Progress, task: Any, phase: str) -> None:
        last: dict[str, Any] = self.samples[-1] if self.samples else {}
        counts = last.get("counts", {})
        rss = ", ".join(f"{life.rss[-1][1]:.0f}" for life in self.fleet.live() if life.rss)
        bar.update(
            task,
            completed=int(time.time() - self.marks.get(phase, self.t0)),
            description=(
                f"{phase}: {counts.get('COMPLETED', 0):,} done, "
                f"{counts.get('PENDING', 0):,} pending, "
                f"{last.get('completed_per_second', 0.0):.1f}/s, RSS {rss} MB, "
                f"{len(self.faults.events)} fault(s)"
            ),
        )

    def execute(self) -> dict[str, Any]:
        args = self.args
        for slot in range(PROCESSES):
            self.fleet.spawn(slot)
        self.fleet.wait_ready(self.fleet.live())
        self.t0 = time.time()
        self.marks["soak"] = self.t0
        self.say(f"{PROCESSES} workers ready; producer at ~{args.rate:.1f} items/s")
        self.producer.start()
        with progress() as bar:
            task = bar.add_task("soak", total=int(args.minutes * 60))
            self.loop_until(self.t0 + args.minutes * 60, bar, task, "soak")
            self.producer.done.set()
            self.producer.join(timeout=30)
            self.faults.clear()
            self.marks["drain"] = time.time()
            self.say(
                f"producer stopped after {self.producer.produced.items:,} items; draining "
                f"(at most {args.drain_minutes:.0f} min)"
            )
            bar.remove_task(task)
            task = bar.add_task("drain", total=int(args.drain_minutes * 60))
            self.loop_until(self.marks["drain"] + args.drain_minutes * 60, bar, task, "drain")
        self.marks["drained"] = time.time()
        self.sample("drained")  # the connections a settled fleet holds, before it stops
        self.say(f"drain over after {self.marks['drained'] - self.marks['drain']:.0f} s")
        self.fleet.stop_all(STOP_TIMEOUT)
        self.marks["stopped"] = time.time()
        self.sample("stopped")
        if self._conn is not None:
            self._conn.close()
        for life in self.fleet.lives:
            if life.how_ended.startswith("sigterm"):
                self.say(f"worker pid {life.pid} ({life.how_ended}) exited {life.exit_code}")
        return self.collect()

    def collect(self) -> dict[str, Any]:
        """Everything the report needs, read before the database is dropped."""
        checks = {
            block: soak_query(self.url, block)
            for block in (
                "open_items",
                "items_per_job",
                "failed_without_reason",
                "good_failed",
                "bad_not_failed",
                "completed_without_result",
                "failure_reasons",
                "jobs_not_final",
                "attempts",
                "completed_seconds",
            )
        }
        held = [i for event in self.faults.events for i in event.held or []]
        checks["held_fate"] = soak_query(self.url, "items_fate", {"ids": held})
        produced = self.producer.produced
        return {
            "settings": {
                "minutes": self.args.minutes,
                "fault_every": self.args.fault_every,
                "producer_rate": self.args.rate,
                "seed": self.args.seed,
                "stub_rpm": STUB_RPM,
                "stub_latency": STUB_LATENCY,
                "processes": PROCESSES,
                "worker_env": WORKER_ENV,
                "hang_seconds": HANG_SECONDS,
                "connection_bound_per_process": POOL_MAX + 1,
            },
            "t0": self.t0,
            "marks": self.marks,
            "produced": {
                "jobs": produced.jobs,
                "items": produced.items,
                "bad": produced.bad,
                "ticks": produced.ticks,
                "errors": produced.errors,
                "unsure_ticks": produced.unsure_ticks,
            },
            "faults": [event.describe() for event in self.faults.events],
            "lives": [life.describe() for life in self.fleet.lives],
            "samples": self.samples,
            "backlog": self.backlog,
            "stub": self.stub.stats(),
            "injected_429s": STORM_429S * sum(e.kind == "429_storm" for e in self.faults.events)
            - self.faults.unused_429s,
            "db": checks,
            "log": self.log,
            "worker_logs": scan_logs(self.fleet.lives),
        }


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text(encoding="utf-8"))
        logs = args.from_raw.parent
    else:
        logs = Path(tempfile.mkdtemp(prefix="listener-soak-"))
        console.rule(f"soak: {args.minutes:g} min, a fault every {args.fault_every:g} s")
        console.print(f"[dim]worker logs in {logs}[/dim]")
        with scratch_database(NAME) as url, stub_process(STUB_RPM, STUB_LATENCY) as stub:
            run = Run(args, url, stub, logs)
            try:
                raw = run.execute()
            finally:
                run.producer.done.set()
                run.fleet.stop_all(STOP_TIMEOUT)
        raw["took_seconds"] = time.monotonic() - started
        # Kept with the logs, so the report can be redone without running again (--from-raw).
        (logs / "raw.json").write_text(json.dumps(raw, default=str), encoding="utf-8")
    result = analyse(raw)
    result["worker_logs_dir"] = str(logs)
    result["took_seconds"] = raw["took_seconds"]
    report = markdown(result)
    result["markdown"] = report
    write_json(NAME, result)
    (RESULTS / f"{NAME}.md").write_text(report, encoding="utf-8")
    console.print(f"[dim]wrote {(RESULTS / f'{NAME}.md').relative_to(RESULTS.parent.parent)}[/dim]")
    plot(result, NAME)
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    verdict = "[red]FAIL[/red]: " + ", ".join(failed) if failed else "[green]PASS[/green]"
    console.rule(f"soak {verdict} ({result['took_seconds'] / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
