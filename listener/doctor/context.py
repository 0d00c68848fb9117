"""What every check reads: one read-only session, the settings, the command's options, and the
readings more than one check needs (taken once)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from listener.settings import Settings
from listener.sqlfiles import queries

APPLICATION_NAME = "listener-doctor"
# Workers beat every <= 5 s: a row older than three beats is no longer a live worker.
LIVE_SECONDS = 15.0


def read_only(conninfo: str) -> str:
    """The conninfo with every transaction read-only: the doctor cannot change the database,
    whatever a check runs (the server refuses any write)."""
    options = conninfo_to_dict(conninfo).get("options") or ""
    return make_conninfo(
        conninfo,
        options=f"{options} -c default_transaction_read_only=on".strip(),
        application_name=APPLICATION_NAME,
    )


@dataclass
class Heartbeat:
    worker_id: str
    hostname: str
    pid: int
    age: float
    listener_connected: bool
    stats: dict[str, Any]

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
        return self.conn.execute(queries("doctor")[block], params or None).fetchall()

    def one(self, block: str, **params: Any) -> tuple[Any, ...] | None:
        rows = self.rows(block, **params)
        return rows[0] if rows else None

    @functools.cached_property
    def heartbeats(self) -> list[Heartbeat]:
        if self.one("has_tracking_table") is None:
            return []
        if self.conn.execute("SELECT to_regclass('worker_heartbeats')").fetchone() == (None,):
            return []
        return [
            Heartbeat(str(r[0]), str(r[1]), int(r[2]), float(r[3]), bool(r[4]), r[5] or {})
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
