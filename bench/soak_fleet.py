"""The soak's moving parts: the worker fleet (processes tracked by slot, since a restart changes
the pid), their memory, and the producer that keeps submitting jobs for many stores."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from bench.common import ROOT, query, sql

logger = logging.getLogger(__name__)


def soak_query(url: str, block: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """A named block of `bench/soak.sql`, on a connection of its own."""
    with psycopg.connect(url, autocommit=True, application_name="soak-harness") as conn:
        return conn.execute(sql("soak")[block], params).fetchall()


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process, from /proc (no dependency); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Life:
    """One process in a slot, from its start to its exit."""

    slot: int
    pid: int
    started: float  # time.time()
    log_path: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    ended: float | None = None
    exit_code: int | None = None
    how_ended: str = ""  # "sigkill", "sigterm (deploy)", "sigterm (end)", "crashed"
    rss: list[tuple[float, float]] = field(default_factory=list)  # (time.time(), MB)

    def describe(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "pid": self.pid,
            "started": self.started,
            "ended": self.ended,
            "exit_code": self.exit_code,
            "how_ended": self.how_ended,
            "log": str(self.log_path),
            "rss": self.rss,
        }


class Fleet:
    """`python -m listener worker` processes, each in a numbered slot. A replacement takes over
    its predecessor's slot; old processes stay tracked until they have exited."""

    def __init__(self, url: str, base_url: str, env: dict[str, str], log_dir: Path) -> None:
        self.url = url
        self.base_url = base_url
        self.env = env
        self.log_dir = log_dir
        self.current: dict[int, Life] = {}
        self.lives: list[Life] = []
        self.stopping: list[Life] = []  # signalled, not yet exited

    def spawn(self, slot: int) -> Life:
        full_env = {
            **os.environ,
            "DATABASE_URL": self.url,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": self.base_url,
            **self.env,
        }
        full_env.pop("PORT", None)
        path = self.log_dir / f"slot{slot}-life{sum(x.slot == slot for x in self.lives)}.log"
        log = path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "listener", "worker"],
            env=full_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        life = Life(slot, process.pid, time.time(), path, process, log)
        self.lives.append(life)
        self.current[slot] = life
        return life

    def wait_ready(self, lives: list[Life], timeout: float = 60.0) -> None:
        """A worker writes its heartbeat row once it has LISTENed and built its ring."""
        deadline = time.monotonic() + timeout
        wanted = {life.pid for life in lives}
        while not wanted <= {int(pid) for (pid,) in query(self.url, "ready_pids")}:
            for life in lives:
                if life.process.poll() is not None:
                    raise RuntimeError(f"worker {life.pid} exited with {life.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(wanted)} did not become ready")
            time.sleep(0.1)

    def kill(self, slot: int) -> Life:
        """SIGKILL, as the OOM killer or a crashed host does, then a replacement in the slot."""
        old = self.current[slot]
        old.process.send_signal(signal.SIGKILL)
        old.how_ended = "sigkill"
        self.stopping.append(old)
        return self.spawn(slot)

    def deploy(self, slot: int) -> Life:
        """An overlapping deploy: the new process first, ready, then SIGTERM to the old one."""
        old = self.current[slot]
        new = self.spawn(slot)
        self.wait_ready([new])
        old.process.send_signal(signal.SIGTERM)
        old.how_ended = "sigterm (deploy)"
        self.stopping.append(old)
        return new

    def live(self) -> list[Life]:
        return [life for life in self.lives if life.ended is None]

    def poll(self) -> list[Life]:
        """Note exits; returns the processes that exited without being asked to (crashes)."""
        crashed = []
        for life in self.live():
            code = life.process.poll()
            if code is None:
                continue
            life.ended, life.exit_code = time.time(), code
            life.log.close()
            if not life.how_ended:
                life.how_ended = "crashed"
                crashed.append(life)
            if life in self.stopping:
                self.stopping.remove(life)
        return crashed

    def sample_rss(self, now: float) -> None:
        for life in self.live():
            mb = rss_mb(life.pid)
            if mb is not None:
                life.rss.append((now, mb))

    def stop_all(self, timeout: float) -> None:
        """SIGTERM to every process (the end of the run); SIGKILL after `timeout`, noted."""
        for life in self.live():
            if not life.how_ended:
                life.how_ended = "sigterm (end)"
            life.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for life in self.live():
            try:
                life.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                life.how_ended += ", then sigkill: did not exit in time"
                life.process.kill()
                life.process.wait()
        self.poll()


# -- the producer -------------------------------------------------------------------------------

BAD_KINDS = ("null", "array", "noname")


@dataclass
class Produced:
    jobs: dict[int, int] = field(default_factory=dict)  # job id -> items
    items: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # kind -> items
    ticks: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)
    unsure_ticks: int = 0  # commits lost with the connection, then found (or not) in the table


class Producer(threading.Thread):
    """Every second: new stores with small jobs, sometimes a regular store's medium job, now and
    then a big one; about `bad_fraction` of the items have a payload the worker must refuse.
    The mean is ~`rate` items a second, below the budget so the backlog drains between faults."""

    def __init__(self, url: str, rate: float, seed: int, bad_fraction: float = 0.015) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.url = url
        self.rate = rate
        self.rng = random.Random(seed)
        self.bad_fraction = bad_fraction
        self.produced = Produced()
        self.done = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None

    def run(self) -> None:
        next_tick = time.monotonic()
        while not self.done.is_set():
            self._tick(self.produced.ticks)
            self.produced.ticks += 1
            next_tick += 1.0
            self.done.wait(max(0.0, next_tick - time.monotonic()))
        if self._conn is not None:
            self._conn.close()

    def _jobs(self, tick: int) -> list[dict[str, Any]]:
        # Shares of the mean rate: 50 % new stores' small jobs (1-5 items, 3 on average),
        # 20 % medium jobs of 20 regular stores (10-40 items), 30 % big jobs (150-300 items).
        rng, jobs = self.rng, []
        for k in range(max(1, round(self.rate * 0.5 / 3))):
            jobs.append((f"store-{tick:05d}-{k}", rng.randint(1, 5)))
        regulars = rng.sample(range(20), 2)
        if rng.random() < self.rate * 0.2 / 25:
            jobs.append((f"regular-{regulars[0]:02d}", rng.randint(10, 40)))
        if rng.random() < self.rate * 0.3 / 225:
            jobs.append((f"regular-{regulars[1]:02d}", rng.randint(150, 300)))
        return [
            {"instance_id": store, "products": [self._product(tick, n) for n in range(count)]}
            for store, count in jobs
        ]

    def _product(self, tick: int, n: int) -> dict[str, Any]:
        if self.rng.random() >= self.bad_fraction:
            name = f"Product {n} (tick {tick})"
            return {"product_id": f"t{tick}-{n}", "payload": {"name": name, "price": n}}
        kind = self.rng.choice(BAD_KINDS)
        payload: Any = {"null": None, "array": [f"Product {n}", n], "noname": {"price": n}}[kind]
        return {"product_id": f"t{tick}-bad-{kind}-{n}", "payload": payload}

    def _tick(self, tick: int) -> None:
        jobs = self._jobs(tick)
        try:
            conn = self._connection()
            rows = conn.execute(sql("soak")["submit"], {"jobs": json.dumps(jobs)}).fetchall()
        except psycopg.Error as error:
            # The commit may or may not have happened: the table has the answer.
            self._conn = None
            self.produced.errors.append((time.time(), str(error).strip().splitlines()[0]))
            self.produced.unsure_ticks += 1
            rows = self._landed(tick)
        if rows:  # one transaction: all of the tick's jobs landed, or none
            for job in jobs:
                for product in job["products"]:
                    if "-bad-" in product["product_id"]:
                        kind = product["product_id"].split("-")[2]
                        self.produced.bad[kind] = self.produced.bad.get(kind, 0) + 1
        for job_id, count in rows:
            self.produced.jobs[int(job_id)] = int(count)
            self.produced.items += int(count)

    def _landed(self, tick: int) -> list[tuple[Any, ...]]:
        for _ in range(30):
            try:
                return soak_query(self.url, "tick_landed", {"prefix": f"t{tick}-%"})
            except psycopg.Error:
                time.sleep(1.0)
        logger.warning("tick %d: could not find out whether its jobs landed", tick)
        return []

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url, autocommit=True, application_name="soak-producer"
            )
        return self._conn
