"""The dashboard sessions' state shared by the fleet, in PostgreSQL: the signing key used when
there is no API_TOKEN, and the sessions a sign-out ended.

A revoked session is refused by every process: at once by the one that signed it out and by
every state-changing request anywhere (each reads the table), and within REVOCATIONS_SECONDS by
the other processes' page reads, which look at a set kept in memory and read again at most once a
period (fifty open pages poll every second: one small read per process, not fifty).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
from psycopg_pool import AsyncConnectionPool

from listener.errors import one_line
from listener.http.fleet import DB_ERRORS, DB_TIMEOUT_SECONDS
from listener.sqlfiles import queries

logger = logging.getLogger(__name__)

KEY_NAME = "session"
KEY_BYTES = 32
REVOCATIONS_SECONDS = 1.0


class SessionStore:
    """Reads and writes `dashboard_keys` and `dashboard_revoked_sessions`."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        period: float = REVOCATIONS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.period = period
        self.clock = clock
        self._revoked: set[str] = set()
        # Signed out here: kept through a reading that started before the sign-out's commit.
        self._local: set[str] = set()
        self._read_at = -math.inf
        self._lock = anyio.Lock()
        # What the tests count: reads of the revocations table.
        self.reads = 0

    async def shared_secret(self) -> bytes:
        """The fleet's secret: stored by the first process that asks, read by every other.
        Raises one of DB_ERRORS when the database does not answer."""
        sql = queries("sessions")
        with anyio.fail_after(DB_TIMEOUT_SECONDS):
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                params = {"name": KEY_NAME, "key": secrets.token_bytes(KEY_BYTES)}
                await conn.execute(sql["insert_key"], params)
                row = await (await conn.execute(sql["select_key"], {"name": KEY_NAME})).fetchone()
        if row is None:  # only if someone deleted the row between the two statements
            raise RuntimeError("the dashboard's session key vanished while being read")
        return bytes(row[0])

    async def revoke(self, nonce: str, expires_at: float) -> None:
        """End a session everywhere; raises one of DB_ERRORS when that could not be recorded."""
        self._revoked.add(nonce)
        self._local.add(nonce)
        params = {"nonce": nonce, "expires_at": datetime.fromtimestamp(expires_at, UTC)}
        with anyio.fail_after(DB_TIMEOUT_SECONDS):
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                await conn.execute(queries("sessions")["revoke"], params)

    async def revoked(self, nonce: str, *, fresh: bool = False) -> bool:
        """Whether a sign-out ended this session. `fresh` reads the table now (and raises one of
        DB_ERRORS when it cannot); otherwise the set read at most a period ago answers, and a
        failed reading keeps the previous set (the page's figures are stale then too)."""
        if nonce in self._revoked:
            return True
        if fresh:
            with anyio.fail_after(DB_TIMEOUT_SECONDS):
                async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                    cursor = await conn.execute(queries("sessions")["is_revoked"], {"nonce": nonce})
                    row = await cursor.fetchone()
            if row is not None and row[0]:
                self._revoked.add(nonce)
                return True
            return False
        if self.clock() - self._read_at >= self.period:
            await self._refresh()
        return nonce in self._revoked

    async def _refresh(self) -> None:
        async with self._lock:
            if self.clock() - self._read_at < self.period:
                return  # another request read it while this one waited
            try:
                with anyio.fail_after(DB_TIMEOUT_SECONDS):
                    async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                        cursor = await conn.execute(queries("sessions")["revoked"])
                        rows = await cursor.fetchall()
            except DB_ERRORS as error:
                logger.warning("[Dashboard] sign-outs not read: %s", one_line(error))
            else:
                self._revoked = {str(row[0]) for row in rows} | self._local
                self.reads += 1
            # Failed or not: the next try waits a period (a flood must not hammer a dead database).
            self._read_at = self.clock()
