"""The LISTEN loop: notifications feed the ready ring; (re)connects and sweeps rebuild it.

The listener owns one connection outside the pool: LISTEN is a session property, so it must be a
direct connection (a transaction-mode pooler such as PgBouncer would silently lose it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import anyio
import psycopg
from anyio.abc import TaskStatus

from listener.announced import retire_stale
from listener.backoff import Backoff
from listener.db import with_options
from listener.errors import DatabaseError, one_line
from listener.handler import DEFAULT_KIND
from listener.items import ReadyStore, ready_stores
from listener.policy import CHANNEL as STORES_CHANNEL
from listener.policy import read_all

logger = logging.getLogger(__name__)

# '<store>' for items of the default kind, '<store>\x1f<kind>' for the others (the trigger).
CHANNEL = "job_items_ready"
# Another process claimed from a store: '<worker id>\x1f<store>\x1f<items>\x1f<lane>' (see the
# claim; the lane is the budget its kinds draw from).
SERVED_CHANNEL = "stores_served"

# A store whose stale row could not be judged (a producer of its lock slot was committing) is
# handed over as due in this long: its dispatcher looks at it then (a claim, or a retirement).
BUSY_RETRY_SECONDS = 0.05

# What a rebuild hands over: the store policy rows, then for each set of kinds asked for (one
# per budget's lane) each store with pending items of those kinds.
Rebuild = Callable[[Sequence[tuple[object, ...]], list[list[ReadyStore]]], None]


class Listener:
    def __init__(
        self,
        conninfo: str,
        on_notify: Callable[[str], None],
        on_rebuild: Rebuild,
        sweep_interval: float,
        on_store_changed: Callable[[str], None] | None = None,
        on_served: Callable[[str], None] | None = None,
        backoff: Backoff | None = None,
        kind_sets: Sequence[Sequence[str]] = ((DEFAULT_KIND,),),
    ) -> None:
        self.conninfo = conninfo
        self.on_notify = on_notify
        self.on_rebuild = on_rebuild
        self.on_store_changed = on_store_changed
        self.on_served = on_served
        self.sweep_interval = sweep_interval
        self.kind_sets = [list(kinds) for kinds in kind_sets]
        self.backoff = backoff or Backoff(base=0.1, cap=10.0, rng=random.Random())
        self.connected = False
        self.reconnects = 0
        self.notifications = 0
        self.backend_pid: int | None = None
        self.stale_retired = 0  # announced stores this listener found drained and retired

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen for ever; report readiness once the first LISTEN and rebuild are done."""
        started = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    with_options(self.conninfo, "listener-listen"), autocommit=True
                ) as conn:
                    await self._serve(conn, task_status if not started else None)
                    started = True
            except (psycopg.OperationalError, DatabaseError) as error:
                was_connected, self.connected = self.connected, False
                started = started or was_connected
                delay = self.backoff.next()
                logger.warning(
                    "[Listener] connection lost or refused (%s); reconnecting in %.1fs",
                    one_line(error),
                    delay,
                )
                self.reconnects += 1
                await anyio.sleep(delay)

    async def _serve(
        self, conn: psycopg.AsyncConnection[object], task_status: TaskStatus[None] | None
    ) -> None:
        # LISTEN before the rebuild: an insert that commits between the two is then either in
        # the scan or in a notification, never in neither.
        await conn.execute(f"LISTEN {CHANNEL}")
        await conn.execute(f"LISTEN {STORES_CHANNEL}")
        await conn.execute(f"LISTEN {SERVED_CHANNEL}")
        self.backend_pid = conn.info.backend_pid
        await self._rebuild(conn, "connected")
        self.connected = True
        self.backoff.reset()
        if task_status is not None:
            task_status.started()
        while True:
            async for notify in conn.notifies(timeout=self.sweep_interval):
                self.notifications += 1
                if notify.channel == CHANNEL:
                    self.on_notify(notify.payload)
                elif notify.channel == SERVED_CHANNEL:
                    if self.on_served is not None:
                        self.on_served(notify.payload)
                elif self.on_store_changed is not None:
                    self.on_store_changed(notify.payload)
            # The safety sweep: a notification lost anywhere delays work by one interval at
            # most. It also proves the connection is alive when nothing has been heard.
            await self._rebuild(conn, "sweep")

    async def _rebuild(self, conn: psycopg.AsyncConnection[object], why: str) -> None:
        # Policies first: a store paused meanwhile must not enter the ring with the scan.
        policies = await read_all(conn)
        stores = [await self._scan(conn, kinds) for kinds in self.kind_sets]
        self.on_rebuild(policies, stores)
        count = len({ready.instance_id for lane in stores for ready in lane})
        if why != "sweep" or count:
            logger.debug("[Listener] %s: %d store(s) with pending items", why, count)

    async def _scan(
        self, conn: psycopg.AsyncConnection[object], kinds: list[str]
    ) -> list[ReadyStore]:
        """Stores with pending items of `kinds`. First the stale announced stores go (nobody
        retired them: a worker stopped between a claim and its retirement, or one older than
        `announced_stores`), or their next items would never be notified: before the scan, so
        that an item committed meanwhile is in the scan or its producer found no row and
        notified."""
        stale = await retire_stale(conn, kinds)
        self.stale_retired += len(stale.retired)
        found = await ready_stores(conn, kinds)
        seen = {ready.instance_id for ready in found}
        found += [
            ReadyStore(store, BUSY_RETRY_SECONDS) for store in stale.busy if store not in seen
        ]
        return found
