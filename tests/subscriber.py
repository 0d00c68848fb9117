"""A `job_finished` subscriber for tests: what an app would run, recording each notification
with what the database showed the moment it arrived."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus

from tests.support import SLACK


@dataclass
class Heard:
    payload: dict[str, Any]
    # Read on another connection as soon as the notification arrived.
    job_status: str | None  # None: the job was gone already (pruned)
    ended: bool
    counts: dict[str, int]


@dataclass
class Subscriber:
    heard: list[Heard] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    flushed: int = 0

    def for_job(self, job_id: int) -> list[Heard]:
        return [h for h in self.heard if h.payload["job_id"] == job_id]

    async def wait_for(self, count: int, deadline: float = 60.0) -> None:
        with anyio.fail_after(deadline * SLACK):
            while len(self.heard) < count:
                await self.changed.wait()

    async def flush(self, conninfo: str, deadline: float = 30.0) -> None:
        """Return once every notification committed before this call has been heard.

        Notifications arrive in commit order: a marker sent now comes after all of them.
        """
        marker = self.flushed + 1
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_notify('job_finished', %s)", (json.dumps({"flush": marker}),)
            )
        with anyio.fail_after(deadline * SLACK):
            while self.flushed < marker:
                await self.changed.wait()

    async def run(
        self, conninfo: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with (
            await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listen,
            await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as look,
        ):
            await listen.execute("LISTEN job_finished")
            task_status.started()
            async for notify in listen.notifies():
                payload = json.loads(notify.payload)
                if "flush" in payload:
                    self.flushed = payload["flush"]
                    self.changed.set()
                    self.changed = anyio.Event()
                    continue
                cursor = await look.execute(
                    "SELECT j.status, j.completed_at IS NOT NULL,"
                    " (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM"
                    "  (SELECT status, count(*) AS n FROM job_items"
                    "   WHERE job_id = j.id GROUP BY status) c)"
                    " FROM jobs j WHERE j.id = %s",
                    (payload["job_id"],),
                )
                row = await cursor.fetchone() or (None, False, {})
                self.heard.append(Heard(payload, row[0], row[1], dict(row[2])))
                self.changed.set()
                self.changed = anyio.Event()


@asynccontextmanager
async def subscribed(conninfo: str) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber()
    async with anyio.create_task_group() as tg:
        await tg.start(subscriber.run, conninfo)
        yield subscriber
        tg.cancel_scope.cancel()
