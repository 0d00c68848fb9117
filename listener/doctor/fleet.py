"""The running fleet: live workers and their listener, LISTEN/NOTIFY delivery, the shared budget
(the checklist's "Check Database Pool" and "Check Rate Limiter")."""

from __future__ import annotations

import secrets
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from listener.doctor.backlog import age
from listener.doctor.context import Context, named
from listener.doctor.report import Check, fail, ok, warn
from listener.handler import DEFAULT_KIND
from listener.sqlfiles import queries

PROBE_SECONDS = 1.0
# A pooler in transaction mode hands each transaction to any server session: the backend pid
# seen by one client connection changes between transactions. A few tries make it show.
POOLER_TRIES = 5


def check_workers(ctx: Context) -> Check:
    live = ctx.live_workers
    if not live:
        last = ctx.heartbeats[0].age if ctx.heartbeats else None
        seen = f"last heartbeat {age(last)} ago" if last is not None else "no heartbeat ever"
        return fail(
            "workers",
            f"no live worker ({seen}): nothing processes the backlog",
            "start `listener worker` (the Procfile's worker); check its logs for the reason it"
            " stopped",
            live=0,
        )
    lines = []
    for beat in live:
        pool = ", ".join(
            f"{key} {beat.number('pool', key):.0f}" for key in ("total", "idle", "waiting", "max")
        )
        lines.append(
            f"{beat.worker_id}: beat {beat.age:.1f}s ago, listener"
            f" {'connected' if beat.listener_connected else 'DISCONNECTED'}; pool {pool}"
        )
    deaf = [beat.worker_id for beat in live if not beat.listener_connected]
    starved = [beat.worker_id for beat in live if beat.number("pool", "waiting") > 0]
    data: dict[str, Any] = {
        "live": len(live),
        "oldest_beat_seconds": max(beat.age for beat in live),
        "listener_disconnected": deaf,
        "pool_waiting": starved,
    }
    summary = f"{len(live)} live, newest beat {min(b.age for b in live):.1f}s ago"
    if deaf:
        check = fail(
            "workers",
            f"{summary}; listener disconnected on {', '.join(deaf)}",
            "a worker without its LISTEN session only finds work at each safety sweep: check"
            " that DATABASE_URL reaches PostgreSQL directly (see `listen`), and its logs",
            **data,
        )
    elif starved:
        check = warn(
            "workers",
            f"{summary}; pool waiting > 0 on {', '.join(starved)}",
            "connection starvation (checklist: Connection Pool Exhausted): increase DB_POOL_MAX"
            " within `connections`, check the plan's limit, restart",
            **data,
        )
    else:
        check = ok("workers", f"{summary}; every listener connected, no pool waiting", **data)
    check.lines = lines
    return check


def check_listen(ctx: Context, listen_conninfo: str | None = None) -> Check:
    """Send a notification on a private channel from one session and wait for it on another:
    what the trigger and the worker's listener do. `listen_conninfo` is where the listening
    session connects (the same database unless a test says otherwise)."""
    channel = f"listener_doctor_{secrets.token_hex(6)}"
    payload = secrets.token_hex(8)
    # Autocommit: LISTEN takes effect at once and notifications arrive between statements. It
    # runs nothing but pg_backend_pid() and LISTEN, which write nothing.
    target = named(listen_conninfo or ctx.conninfo)
    with psycopg.connect(target, autocommit=True, connect_timeout=10) as listener:
        sessions = [
            listener.execute(queries("doctor")["backend_pid"]).fetchone()
            for _ in range(POOLER_TRIES)
        ]
        pids = {session[0] for session in sessions if session}
        server_port = sessions[0][1] if sessions[0] else None
        client_port = listener.info.port
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        started = time.perf_counter()
        ctx.rows("notify", channel=channel, payload=payload)  # sent when its transaction commits
        arrived = any(
            note.channel == channel and note.payload == payload
            for note in listener.notifies(timeout=PROBE_SECONDS, stop_after=1)
        )
        elapsed = time.perf_counter() - started
    pooled = len(pids) > 1
    # Through a socket file the "port" names the socket; only TCP ports can be compared.
    proxied = server_port is not None and not _is_socket_host(target) and server_port != client_port
    data = {
        "delivered": arrived,
        "seconds": round(elapsed, 4),
        "pooler_suspected": pooled,
        "client_port": client_port,
        "server_port": server_port,
    }
    between = (
        f"; port {client_port} forwards to PostgreSQL's {server_port}: a pooler or proxy"
        if proxied
        else ""
    )
    if arrived and not pooled:
        return ok(
            "listen", f"a probe notification arrived in {elapsed * 1000:.1f} ms{between}", **data
        )
    why = (
        "the server session changed between transactions: a pooler in transaction mode"
        " (PgBouncer) is in front, and LISTEN needs a session"
        if pooled
        else "LISTEN is not delivered (a transaction-mode PgBouncer in front of PostgreSQL?)"
    )
    heard = "arrived, but " if arrived else f"did not arrive within {PROBE_SECONDS:g}s: "
    return fail(
        "listen",
        f"a probe notification {heard}{why}{between}",
        "point DATABASE_URL at PostgreSQL directly (Render's internal URL), not a"
        " transaction-mode pooler: without LISTEN the worker only finds new work at each"
        " safety sweep (SWEEP_INTERVAL_SECONDS)",
        **data,
    )


def _is_socket_host(conninfo: str) -> bool:
    host = conninfo_to_dict(conninfo).get("host") or ""
    return not host or str(host).startswith("/")


def check_budget(ctx: Context) -> Check:
    settings = ctx.settings
    live = ctx.live_workers
    rpm = max([int(b.number("rpm")) for b in live] or [settings.rate_limit_rpm])
    tpm = max([int(b.number("tpm")) for b in live] or [settings.rate_limit_tpm])
    requests = int(sum(b.number("requestsInLastMinute") for b in live))
    tokens = int(sum(b.number("tokensInLastMinute") for b in live))
    recent_429 = int(sum(b.number("rateLimitedTotal") for b in live))
    row = ctx.one("limiter", name=settings.rate_limiter_name)
    data: dict[str, Any] = {
        "limiter": settings.rate_limiter_name,
        "rpm": rpm,
        "tpm": tpm,
        "requests_last_minute": requests,
        "tokens_last_minute": tokens,
        "rate_limited_since_workers_started": recent_429,
    }
    use = f"{requests:,}/{rpm:,} RPM ({requests / rpm:.0%})" if rpm else f"{requests:,} RPM"
    use += f", {tokens:,}/{tpm:,} TPM ({tokens / tpm:.0%})" if tpm else f", {tokens:,} TPM"
    if not rpm and not tpm:
        return ok("budget", f"no budget (RATE_LIMIT_RPM=0, TPM=0): {use}", **data)
    if row is None:
        return warn(
            "budget",
            f"no limiter row {settings.rate_limiter_name!r} yet: no worker has taken a slot",
            "expected before the first item; otherwise check RATE_LIMITER_NAME matches the"
            " workers'",
            **data,
        )
    paused, total_429 = float(row[0]), int(row[1])
    data |= {"paused_seconds": paused, "rate_limited_total": total_429}
    summary = f"{use}; 429s: {recent_429} since the live workers started, {total_429} in all"
    if paused > 0:
        return warn(
            "budget",
            f"{summary}; every worker paused for {paused:.1f}s more after a 429",
            "OpenAI answered 429: the fleet waits out retry-after; if it recurs, lower"
            " RATE_LIMIT_RPM/TPM to the account's real limits",
            **data,
        )
    if rpm and requests > rpm:
        return warn(
            "budget",
            summary,
            "more requests than RATE_LIMIT_RPM in the last minute: do all processes share"
            " RATE_LIMITER_NAME and the same budget?",
            **data,
        )
    return ok("budget", summary, **data)


def check_kinds(ctx: Context) -> Check:
    """Every kind of an open job is served by some live worker (a worker that says nothing of
    its kinds, from before kinds existed, serves today's)."""
    served = sorted(
        {
            str(kind)
            for beat in ctx.live_workers
            for kind in (beat.stats.get("kinds") or [DEFAULT_KIND])
        }
    )
    rows = ctx.rows("unserved_kinds", served=served)
    unserved = {str(kind): int(jobs) for kind, jobs in rows}
    if not unserved:
        shown = ", ".join(served) or "none"
        return ok(
            "kinds", f"every open job's kind has a live worker (served: {shown})", served=served
        )
    names = ", ".join(f"{kind} ({jobs} open job(s))" for kind, jobs in unserved.items())
    return fail(
        "kinds",
        f"no live worker serves kind {names}: their items stay PENDING",
        "start a worker whose app registers the kind (`listener worker --app module:app`, or the"
        " kind in OPENAI_KINDS_FILE), or check WORKER_KINDS; cancel the jobs if the kind is gone",
        served=served,
        unserved=unserved,
    )
