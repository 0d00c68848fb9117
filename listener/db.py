"""The connection pool and its stats, in the deployment checklist's log format."""

from __future__ import annotations

import logging

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from listener.backoff import Backoff

# An `X as X` import is a re-export: the engine's modules import `wrap` from here.
from listener.errors import DatabaseError, one_line
from listener.errors import database_call as database_call
from listener.errors import wrap as wrap
from listener.settings import Settings
from listener.sqlfiles import queries
from listener.workerstats import PoolStats

logger = logging.getLogger(__name__)

# Dead TCP peers (a database failover, a NAT dropping the flow) surface in about a minute
# instead of hanging a LISTEN connection forever.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def with_options(conninfo: str, application_name: str) -> str:
    """The conninfo with our keepalives and a name that shows in pg_stat_activity."""
    return make_conninfo(conninfo, application_name=application_name, **KEEPALIVES)


def with_session_options(conninfo: str, settings: Settings) -> str:
    """The conninfo with the worker's and the api's session settings: DB_LOCK_TIMEOUT_SECONDS,
    DB_STATEMENT_TIMEOUT_SECONDS and generic plans for prepared statements.

    In the startup packet's `options`, after any the URL sets (ours win over the same names):
    no extra round trip per connection, and nothing to reset when a connection is reused.

    Generic plans: psycopg prepares a statement on its fifth run on a connection. Our repeated
    statements (the claim, outcomes, leases, the limiter, heartbeats) are all index probes by
    store, id or array of ids, whose plan does not depend on the values; with custom plans each
    run was planned again, which was half of an idle worker's claim (0.96 -> 0.45 ms).
    """
    ours = " ".join(
        [
            f"-c {name}={max(1, round(seconds * 1000))}"
            for name, seconds in (
                ("lock_timeout", settings.db_lock_timeout_seconds),
                ("statement_timeout", settings.db_statement_timeout_seconds),
            )
        ]
        + ["-c plan_cache_mode=force_generic_plan"]
    )
    theirs = conninfo_to_dict(conninfo).get("options")
    return make_conninfo(conninfo, options=f"{theirs} {ours}" if theirs else ours)


async def open_pool(
    conninfo: str, settings: Settings, name: str = "listener"
) -> AsyncConnectionPool:
    """Open the pool; it reconnects by itself, with backoff, when the database restarts.

    Its sessions carry the lock and statement timeouts and generic plans (`with_session_options`).
    """
    pool = AsyncConnectionPool(
        with_options(with_session_options(conninfo, settings), name),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        kwargs={"autocommit": True},
        open=False,
        name=name,
        timeout=30.0,
        reconnect_timeout=0,  # keep trying for ever: a restarting database comes back
    )
    logger.info(
        "[DB Pool] Configuration: { max: %d, min: %d, timeout: 30s, application_name: %s }",
        settings.db_pool_max,
        settings.db_pool_min,
        name,
    )
    try:
        await pool.open(wait=True, timeout=30.0)
    except Exception as error:
        await pool.close()
        raise DatabaseError(f"cannot open the connection pool: {error}") from error
    return pool


async def wait_for_database(
    conninfo: str, backoff: Backoff | None = None, connect_timeout: int = 10
) -> None:
    """Return once the database answers and holds our schema.

    An unreachable database (starting, restarting, a network cut, not yet created) is retried
    for ever with capped, jittered backoff, one warning line per attempt: an outage is not a
    crash loop. A database without the schema is a deploy mistake and raises at once.
    """
    backoff = backoff or Backoff(base=1.0, cap=30.0)
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, connect_timeout=connect_timeout
            )
        except psycopg.OperationalError as error:
            delay = backoff.next()
            logger.warning(
                "[DB] database unreachable (attempt %d): %s; retrying in %.1fs",
                backoff.attempt,
                one_line(error),
                delay,
            )
            await anyio.sleep(delay)
            continue
        async with conn:
            cursor = await conn.execute(queries("db")["schema_ready"])
            row = await cursor.fetchone()
        if not (row and row[0]):
            raise DatabaseError(
                "the database has no job_items table: run `listener migrate up` first"
            )
        if backoff.attempt:
            logger.info("[DB] database reachable after %d attempt(s)", backoff.attempt + 1)
        return


def pool_stats(pool: AsyncConnectionPool) -> PoolStats:
    stats = pool.get_stats()
    return {
        "total": stats.get("pool_size", 0),
        "idle": stats.get("pool_available", 0),
        "waiting": stats.get("requests_waiting", 0),
        "max": pool.max_size,
    }


def format_pool_stats(stats: PoolStats) -> str:
    return f"{{ total: {stats['total']}, idle: {stats['idle']}, waiting: {stats['waiting']} }}"


async def log_pool_stats(pool: AsyncConnectionPool, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        stats = pool_stats(pool)
        level = logging.WARNING if stats["waiting"] else logging.INFO
        logger.log(level, "[DB Pool] Stats: %s", format_pool_stats(stats))
