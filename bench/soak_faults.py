"""The soak's faults, one every interval, in a fixed cycle; each logged with its time.

Kills and deploys always hit slot 1, so slot 0's process lives through the whole run and its
memory can be read as a trend. A deploy in production replaces every process; here the other
slot takes every restart instead, which exercises the same code paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import ADMIN_URL, StubProcess
from bench.soak_fleet import Fleet, soak_query

CYCLE = ("kill", "db_restart", "429_storm", "5xx_burst", "malformed", "hung", "deploy")
TARGET_SLOT = 1
STORM_429S = 30
BURST_SECONDS = 15.0
BURST_FAIL_RATE = 0.5
MALFORMED = 20
HUNG = 10


@dataclass
class FaultEvent:
    number: int
    kind: str
    at: float  # time.time()
    detail: str = ""
    ended: float | None = None  # for faults that last (the 5xx burst)
    held: list[int] | None = None  # a killed worker's items at its death

    def describe(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "kind": self.kind,
            "at": self.at,
            "detail": self.detail,
            "ended": self.ended,
            "held": self.held,
        }


class Faults:
    """Injects the next fault of the cycle when it is due, and ends the ones that last."""

    def __init__(
        self,
        fleet: Fleet,
        stub: StubProcess,
        dbname: str,
        hang_seconds: float,
        say: Callable[[str], None],
    ) -> None:
        self.fleet = fleet
        self.stub = stub
        self.dbname = dbname
        self.hang_seconds = hang_seconds
        self.say = say
        self.events: list[FaultEvent] = []
        self.unused_429s = 0  # a storm's 429s the stub had not sent when the run ended
        self._burst: FaultEvent | None = None

    def inject(self) -> FaultEvent:
        kind = CYCLE[len(self.events) % len(CYCLE)]
        event = FaultEvent(len(self.events) + 1, kind, time.time())
        self.events.append(event)
        event.detail = getattr(self, f"_{kind}")(event)
        self.say(f"fault {event.number} ({kind}): {event.detail}")
        return event

    def tick(self) -> None:
        """End a 5xx burst whose time is up."""
        burst = self._burst
        if burst is not None and time.time() >= burst.at + BURST_SECONDS:
            self._faults({"fail_rate": 0.0})
            burst.ended = time.time()
            self._burst = None
            self.say(f"fault {burst.number} (5xx_burst) over: fail_rate back to 0")

    def clear(self) -> None:
        """No fault left in force (the end of the run)."""
        left = httpx.get(f"{self.stub.url}/stub/faults", timeout=5).json()["fail_next_status"]
        self.unused_429s = sum(status == 429 for status in left)
        self._faults({"fail_rate": 0.0, "fail_next_status": [], "timeout_next": 0})
        self._faults({"malformed_next": 0})
        if self._burst is not None:
            self._burst.ended = time.time()
            self._burst = None

    def _faults(self, updates: dict[str, Any]) -> None:
        httpx.post(f"{self.stub.url}/stub/faults", json=updates, timeout=5).raise_for_status()

    # -- the faults ---------------------------------------------------------------------------

    def _kill(self, event: FaultEvent) -> str:
        old = self.fleet.current[TARGET_SLOT]
        # A worker holds an item or two at a time at this rate: kill it while it holds some
        # (waiting at most 5 s), or the kill would prove nothing about its items coming back.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not soak_query(
            self.fleet.url, "held_by_pid", {"pid": old.pid}
        ):
            time.sleep(0.02)
        new = self.fleet.kill(TARGET_SLOT)
        # Once it is dead, what it still holds is exactly what it held when it died: nothing it
        # did can land any more. Those items must come back (lease) and be done by others.
        old.process.wait()
        rows = soak_query(self.fleet.url, "held_by_pid", {"pid": old.pid})
        event.held = [int(item_id) for (item_id,) in rows]
        return (
            f"SIGKILL worker slot {TARGET_SLOT} (pid {old.pid}, {len(event.held)} item(s) in "
            f"flight); replacement pid {new.pid}"
        )

    def _db_restart(self, _event: FaultEvent) -> str:
        # From the admin database, so the session doing it is not one of those cut.
        ((cut,),) = soak_query(ADMIN_URL, "terminate_all", {"dbname": self.dbname})
        return f"pg_terminate_backend: {cut} session(s) of {self.dbname} cut"

    def _429_storm(self, _event: FaultEvent) -> str:
        self._faults({"fail_next_status": [429] * STORM_429S})
        return f"the next {STORM_429S} requests answer 429 (retry-after 1 s)"

    def _5xx_burst(self, event: FaultEvent) -> str:
        self._faults({"fail_rate": BURST_FAIL_RATE})
        self._burst = event
        return f"fail_rate {BURST_FAIL_RATE} (500s) for {BURST_SECONDS:.0f} s"

    def _malformed(self, _event: FaultEvent) -> str:
        self._faults({"malformed_next": MALFORMED})
        return f"the next {MALFORMED} answers are truncated JSON"

    def _hung(self, _event: FaultEvent) -> str:
        self._faults({"timeout_next": HUNG, "hang_seconds": self.hang_seconds})
        return f"the next {HUNG} requests hang {self.hang_seconds:.0f} s (a hung connection)"

    def _deploy(self, _event: FaultEvent) -> str:
        old = self.fleet.current[TARGET_SLOT]
        started = time.monotonic()
        new = self.fleet.deploy(TARGET_SLOT)
        return (
            f"deploy: new worker pid {new.pid} ready in {time.monotonic() - started:.1f} s, "
            f"then SIGTERM to pid {old.pid}"
        )
