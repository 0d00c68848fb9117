"""What every check reads: one read-only session, the settings, the command's options, and the
readings more than one check needs (taken once)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from listener.settings import Settings
from listener.sqlfiles import queries
from listener.workerstats import WorkerStats, as_worker_stats

APPLICATION_NAME = "listener-doctor"
# Workers beat every <= 5 s: a row older than three beats is no longer a live worker.
LIVE_SECONDS = 15.0


def named(conninfo: str) -> str:
    return make_conninfo(conninfo, application_name=APPLICATION_NAME)


def connect_read_only(conninfo: str) -> psycopg.Connection[tuple[Any, ...]]:
    """The doctor's session: every statement in a `BEGIN READ ONLY` transaction, so the server
    refuses any write whatever a check runs. (A transaction attribute, not a startup option: a
    PgBouncer in front refuses or drops startup options, and the doctor must still diagnose it.)
    """
    conn = psycopg.connect(named(conninfo), connect_timeout=10)
    conn.read_only = True
    return conn


@dataclass
class Heartbeat:
    worker_id: str
    hostname: str
    pid: int
    age: float
    listener_connected: bool
    stats: WorkerStats

    def number(self, *path: str) -> float:
        value: Any = self.stats
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else 0.0


class Context:
    def __init__(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        conninfo: str,
        settings: Settings,
        processes: int | None = None,
        api_processes: int = 1,
    ) -> None:
        self.conn = conn
        self.conninfo = conninfo
        self.settings = settings
        self.processes_option = processes
        self.api_processes = api_processes

    def rows(self, block: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.conn.transaction():
            return self.conn.execute(queries("doctor")[block], params or None).fetchall()

    def one(self, block: str, **params: Any) -> tuple[Any, ...] | None:
        rows = self.rows(block, **params)
        return rows[0] if rows else None

    @functools.cached_property
    def heartbeats(self) -> list[Heartbeat]:
        if self.one("has_heartbeats") == (False,):
            return []
        return [
            Heartbeat(
                str(r[0]), str(r[1]), int(r[2]), float(r[3]), bool(r[4]), as_worker_stats(r[5])
            )
            for r in self.rows("heartbeats")
        ]

    @property
    def live_workers(self) -> list[Heartbeat]:
        return [beat for beat in self.heartbeats if beat.age <= LIVE_SECONDS]

    @property
    def processes(self) -> int:
        """Worker processes the fleet runs: --processes, else the live heartbeats (at least 1)."""
        if self.processes_option is not None:
            return self.processes_option
        return max(1, len(self.live_workers))
