"""Connections (the checklist's "Check Render Plan" and "Connection Pool Exhausted") and the
effective settings with what is risky in them."""

from __future__ import annotations

import ipaddress

from listener import redact
from listener.doctor.context import Context
from listener.doctor.report import Check, fail, ok, warn

# The deployment checklist's table: plan, max connections, recommended pool (whole fleet).
RENDER_PLANS = (("Free", 20, 18), ("Starter", 60, 50), ("Standard", 120, 100), ("Pro", 500, 200))
HEADROOM_WARNING = 0.20
MIGRATION_RUNNER = 1  # `migrate up` on the next deploy holds one session


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def fleet_needs(ctx: Context) -> int:
    """processes × (DB_POOL_MAX + 1 listener) + api × DB_POOL_MAX + the migration runner."""
    pool = ctx.settings.db_pool_max
    return ctx.processes * (pool + 1) + ctx.api_processes * pool + MIGRATION_RUNNER


def usable_connections(ctx: Context) -> tuple[int, int]:
    row = ctx.one("connection_limits")
    assert row is not None, "SHOW always answers"
    return int(row[0]), int(row[1])


def check_connections(ctx: Context) -> Check:
    max_connections, reserved = usable_connections(ctx)
    usable = max_connections - reserved
    in_use = {str(r[0]): int(r[1]) for r in ctx.rows("connections_by_application")}
    needs = fleet_needs(ctx)
    source = "--processes" if ctx.processes_option is not None else "live heartbeats"
    pool = ctx.settings.db_pool_max
    formula = (
        f"{ctx.processes} worker(s) ({source}) × (DB_POOL_MAX {pool} + 1) + {ctx.api_processes}"
        f" api × {pool} + 1 migration runner = {needs}"
    )
    headroom = (usable - needs) / usable if usable else -1.0
    data = {
        "max_connections": max_connections,
        "superuser_reserved": reserved,
        "in_use": in_use,
        "fleet_needs": needs,
        "processes": ctx.processes,
        "headroom": round(headroom, 3),
        "render_plans": [
            {"plan": p, "max_connections": m, "recommended_pool": r} for p, m, r in RENDER_PLANS
        ],
    }
    lines = [f"fleet: {formula}"]
    lines.append(
        "in use now: " + (", ".join(f"{name} {count}" for name, count in in_use.items()) or "none")
    )
    lines.append(
        "Render plans (max connections / recommended pool for the fleet): "
        + ", ".join(f"{p} {m}/{r}" for p, m, r in RENDER_PLANS)
    )
    summary = (
        f"the fleet holds up to {needs} of {usable} usable (max_connections {max_connections}"
        f" − {reserved} reserved); {sum(in_use.values())} in use now"
    )
    if needs > usable:
        # The largest pool with which this fleet fits: p × (pool + 1) + a × pool + 1 <= usable.
        fits = (usable - MIGRATION_RUNNER - ctx.processes) // (ctx.processes + ctx.api_processes)
        check = fail(
            "connections",
            summary,
            f"lower DB_POOL_MAX to {max(1, fits)} or less at this fleet size, run fewer"
            " processes, or move to a larger plan (checklist: Connection Pool Exhausted)",
            **data,
        )
    elif headroom < HEADROOM_WARNING:
        check = warn(
            "connections",
            summary + f" ({headroom:.0%} headroom)",
            "under 20 % headroom: a deploy's overlap (old and new processes) or psql sessions"
            " can exhaust the server; lower DB_POOL_MAX or move to a larger plan",
            **data,
        )
    else:
        check = ok("connections", summary + f" ({headroom:.0%} headroom)", **data)
    check.lines = lines
    return check


def _wrapped(words: list[str], width: int = 96) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def check_settings(ctx: Context) -> Check:
    settings = ctx.settings
    max_connections, reserved = usable_connections(ctx)
    risks: list[str] = []
    fatal = settings.db_pool_max + 1 > max_connections - reserved
    if fatal:
        risks.append(
            f"DB_POOL_MAX {settings.db_pool_max} + 1 exceeds what the database allows"
            f" ({max_connections - reserved}) for even one process"
        )
    if settings.rate_limit_rpm:
        # A call lasts at most OPENAI_TIMEOUT_SECONDS: more items in flight than the budget
        # starts in that time can never hold a slot.
        usable = settings.rate_limit_rpm / 60 * settings.openai_timeout_seconds
        in_flight = settings.worker_concurrency * ctx.processes
        if in_flight > 2 * usable:
            risks.append(
                f"WORKER_CONCURRENCY {settings.worker_concurrency} × {ctx.processes} process(es)"
                f" = {in_flight} in flight, but {settings.rate_limit_rpm} RPM starts at most"
                f" {usable:.0f} in OPENAI_TIMEOUT_SECONDS ({settings.openai_timeout_seconds:g}s)"
            )
    if settings.api_token is None and not is_loopback(settings.http_host):
        risks.append(
            f"HTTP_HOST {settings.http_host} serves the stats to other machines without API_TOKEN"
        )
    lines = redact.settings_lines(settings)
    if risks:
        check = (fail if fatal else warn)(
            "settings",
            f"{len(risks)} risk(s): " + "; ".join(risks),
            "see the README's settings table; set API_TOKEN where HTTP leaves the machine",
            risks=risks,
            settings=lines,
        )
    else:
        check = ok("settings", f"{len(lines)} settings, nothing risky", settings=lines)
    check.lines = _wrapped(lines)
    return check
