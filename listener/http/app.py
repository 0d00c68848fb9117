"""Health, the fleet's rate-limiter stats and Prometheus metrics over HTTP.

Every figure but the pool's is the whole fleet's (`fleet.py` reads them from PostgreSQL), so any
process can answer: a worker serving on PORT, or `listener api` on platforms whose workers take no
inbound traffic.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.db import pool_stats
from listener.errors import one_line
from listener.http.auth import BearerTokenMiddleware
from listener.http.costs import COST_SECONDS, CostReport, FleetCosts, cost_metrics
from listener.http.dashboard import Dashboard
from listener.http.fleet import DB_ERRORS, Fleet, FleetSnapshot, usage
from listener.http.health import Beating, Health
from listener.http.hosts import AllowedHosts, AllowedHostsMiddleware
from listener.http.serve import EmbeddedServer, serving
from listener.openai import prices
from listener.redact import redact
from listener.settings import Settings, check_host, split_list

if TYPE_CHECKING:
    from listener.worker import Worker

logger = logging.getLogger(__name__)

DEFAULT_API_PORT = 3000  # the deployment checklist's `curl http://localhost:3000/...`
TOP_STORES = 50  # bounds the `store` label's cardinality

# Per-worker counters in the heartbeat's stats, exposed as counters with a `worker` label.
WORKER_COUNTERS = {
    "claims": ("listener_claims", "Claim statements that returned items"),
    "claimedItems": ("listener_claimed_items", "Items claimed"),
    "completed": ("listener_items_completed", "Items completed"),
    "failed": ("listener_items_failed", "Items failed for good"),
    "retried": ("listener_items_retried", "Item attempts that failed and were rescheduled"),
    "released": ("listener_items_released", "Items returned to PENDING without using an attempt"),
    "reaped": ("listener_items_reaped", "Items whose expired lease the reaper returned"),
    "superseded": (
        "listener_outcomes_superseded",
        "Outcomes refused because the item's lease had expired and it was taken back",
    ),
}


def rate_limiter_stats(fleet: Fleet) -> dict[str, Any]:
    requests = fleet.total("requestsInLastMinute")
    tokens = fleet.total("tokensInLastMinute")
    return {
        "queueLength": fleet.ready,
        "requestsInLastMinute": requests,
        "rpmUsagePercent": round(100 * usage(requests, fleet.rpm), 1),
        "rpmLimit": fleet.rpm,
        "tokensInLastMinute": tokens,
        "tpmLimit": fleet.tpm,
        "tpmUsagePercent": round(100 * usage(tokens, fleet.tpm), 1),
        "waiters": fleet.total("waiters"),
        "inFlight": fleet.total("inFlight"),
        "processing": fleet.processing,
        "pending": fleet.pending,
        "rateLimitedTotal": fleet.rate_limited_total,
        "pausedUntil": fleet.paused_until.isoformat() if fleet.paused_until else None,
        "workers": len(fleet.workers),
        # Above 10,000 open items the counts are the planner's estimate (bounded cost).
        "countsEstimated": fleet.estimated,
    }


def _labelled(
    kind: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Iterable[tuple[str, float]],
) -> Metric:
    family = kind(name, doc, labels=[label])
    for key, value in values:
        family.add_metric([key], value)
    return family


class FleetCollector(Collector):
    """Renders the `Fleet` the handler fetched just before (collectors cannot await)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self.fleet: Fleet | None = None
        self.costs: FleetCosts | None = None

    def collect(self) -> Iterable[Metric]:
        pool = pool_stats(self.pool)
        yield _labelled(
            GaugeMetricFamily,
            "listener_db_pool_connections",
            "This process's pool: connections open (total), idle, requests waiting for one",
            "state",
            [(state, pool[state]) for state in ("total", "idle", "waiting")],
        )
        yield GaugeMetricFamily(
            "listener_db_pool_max_connections", "This process's pool size limit", pool["max"]
        )
        fleet = self.fleet
        yield GaugeMetricFamily(
            "listener_database_up",
            "1 when this scrape read the fleet's figures from PostgreSQL",
            1 if fleet else 0,
        )
        if fleet is None:
            return
        yield _labelled(
            GaugeMetricFamily,
            "listener_items",
            "Open items by status (ready: PENDING and due now); finished items are not counted;"
            " exact up to 10,000, the planner's estimate above",
            "status",
            [("pending", fleet.pending), ("ready", fleet.ready), ("processing", fleet.processing)],
        )
        requests = fleet.total("requestsInLastMinute")
        tokens = fleet.total("tokensInLastMinute")
        for name, doc, value in (
            ("workers", "Live worker processes", len(fleet.workers)),
            ("requests_last_minute", "OpenAI requests of the last minute", requests),
            ("tokens_last_minute", "OpenAI tokens of the last minute", tokens),
            ("rpm_limit", "Requests per minute budget (0: none)", fleet.rpm),
            ("tpm_limit", "Tokens per minute budget (0: none)", fleet.tpm),
            ("rpm_usage_ratio", "Requests of the last minute / RPM", usage(requests, fleet.rpm)),
            ("tpm_usage_ratio", "Tokens of the last minute / TPM", usage(tokens, fleet.tpm)),
            ("limiter_waiters", "Workers waiting for a limiter slot", fleet.total("waiters")),
            ("items_in_flight", "Items whose handler runs now", fleet.total("inFlight")),
        ):
            yield GaugeMetricFamily(f"listener_{name}", doc, value)
        yield CounterMetricFamily(
            "listener_rate_limited",
            "429 answers from OpenAI, fleet-wide (kept in the shared limiter's row)",
            fleet.rate_limited_total,
        )
        # Each worker process counts since it started: a counter per process (`worker` label)
        # lets rate() see restarts as resets, which a fleet-wide sum would show as a drop.
        for key, (name, doc) in WORKER_COUNTERS.items():
            yield _labelled(
                CounterMetricFamily,
                name,
                f"{doc}, per worker process since it started",
                "worker",
                [(worker.worker_id, worker.number(key)) for worker in fleet.workers],
            )
        yield _labelled(
            GaugeMetricFamily,
            "listener_worker_listener_connected",
            "1 while the worker's LISTEN connection is up",
            "worker",
            [(worker.worker_id, int(worker.listener_connected)) for worker in fleet.workers],
        )
        yield _labelled(
            GaugeMetricFamily,
            "listener_store_items_in_flight",
            f"Items whose handler runs now, per store (the {TOP_STORES} busiest)",
            "store",
            fleet.in_flight_by_store().most_common(TOP_STORES),
        )
        if self.costs is not None:
            yield from cost_metrics(self.costs)


def build_app(
    pool: AsyncConnectionPool,
    settings: Settings,
    worker: Worker | Beating | None = None,
    *,
    cost_seconds: float = COST_SECONDS,
) -> Starlette:
    collector = FleetCollector(pool)
    snapshot = FleetSnapshot(pool, settings)
    # Read at start: a broken OPENAI_PRICES_FILE stops the process with one line.
    costs = CostReport(pool, prices.load(settings.openai_prices_file), period=cost_seconds)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    checker = Health(pool, worker)

    async def health(request: Request) -> Response:
        answer = await checker.answer()
        if answer.status_code != 200:
            return _error(answer.body, answer.reason)
        return JSONResponse(answer.body)

    async def stats(request: Request) -> Response:
        try:
            fleet = await snapshot.get()
        except DB_ERRORS as error:
            return _error({}, f"database unreachable: {one_line(error)}")
        return JSONResponse({"status": "ok", "rateLimiter": rate_limiter_stats(fleet)})

    async def metrics(request: Request) -> Response:
        try:
            fleet: Fleet | None = await snapshot.get()
        except DB_ERRORS as error:
            # Still answer: the pool's figures and listener_database_up 0 are what to alert on.
            logger.warning("[HTTP] /metrics without the fleet's figures: %s", one_line(error))
            fleet = None
        fleet_costs = await costs.get() if fleet is not None else None
        # No await between setting and rendering: concurrent scrapes cannot mix their readings.
        collector.fleet = fleet
        collector.costs = fleet_costs
        try:
            body = generate_latest(registry)
        finally:
            collector.fleet = None
            collector.costs = None
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    dashboard = Dashboard(pool, settings, costs=costs)
    # Outermost: a request naming a foreign Host (DNS rebinding) goes no further.
    hosts = AllowedHosts.from_settings(settings.allowed_hosts)
    middleware = [Middleware(AllowedHostsMiddleware, hosts=hosts)]
    if settings.api_token is not None:
        middleware.append(
            Middleware(
                BearerTokenMiddleware, token=settings.api_token, signed_in=dashboard.signed_in
            )
        )
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/api/rate-limiter/stats", stats, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *dashboard.routes(),
        ],
        middleware=middleware,
    )
    app.state.dashboard = dashboard
    app.state.health = checker
    return app


def _error(body: dict[str, Any], reason: str) -> JSONResponse:
    # The reason quotes a database error: masked like a log line, in case it echoes a secret.
    return JSONResponse({**body, "status": "error", "error": redact(reason)}, status_code=503)


def _announce(server: EmbeddedServer, settings: Settings) -> None:
    host = server.host
    guard = "API_TOKEN required but for /health" if settings.api_token else "no API_TOKEN"
    logger.info(
        "[HTTP] serving the dashboard, health, stats and metrics on port %d (%s; %s)",
        server.port,
        host,
        guard,
    )
    if settings.api_token is None and not _is_loopback(host):
        logger.warning(
            "[HTTP] %s is reachable from other machines and API_TOKEN is unset: anyone who "
            "reaches port %d reads the stats and metrics",
            host,
            server.port,
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve_worker_http(
    settings: Settings,
    pool: AsyncConnectionPool,
    worker: Worker | None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on HTTP_HOST:PORT inside the current event loop until cancelled."""
    port = settings.port or DEFAULT_API_PORT
    app = build_app(pool, settings, worker)
    trusted = split_list(settings.forwarded_allow_ips)
    async with serving(app, settings.http_host, port, forwarded_allow_ips=trusted) as server:
        _announce(server, settings)
        task_status.started()
        await anyio.sleep_forever()


async def run_api(settings: Settings, conninfo: str, host: str, port: int) -> int:
    """`listener api`'s body: HTTP alone until SIGTERM or SIGINT."""
    from listener.db import open_pool, wait_for_database

    try:
        async with anyio.create_task_group() as tg:
            # A signal cancels everything, even the wait for a database that is unreachable.
            await tg.start(_cancel_on_signal, tg.cancel_scope)
            await wait_for_database(conninfo)
            pool = await open_pool(conninfo, settings, name="listener-api")
            try:
                app = build_app(pool, settings)
                trusted = split_list(settings.forwarded_allow_ips)
                async with serving(app, host, port, forwarded_allow_ips=trusted) as server:
                    _announce(server, settings)
                    await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await pool.close()
    except BaseExceptionGroup as group:
        # A lone ListenerError (port in use, database unreachable) reaches the CLI as itself,
        # which prints its one line instead of a traceback.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return 0


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            logger.info("[HTTP] %s received: stopping", signal.Signals(signum).name)
            scope.cancel()
            return


def _api(args: argparse.Namespace, settings: Settings) -> int:
    from listener.database import resolve_database

    url = resolve_database(settings)
    port: int = args.port if args.port is not None else settings.port or DEFAULT_API_PORT
    host: str = args.host if args.host is not None else settings.http_host
    return anyio.run(run_api, settings, url, host, port)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _host(text: str) -> str:
    try:
        return check_host(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(commands: Any) -> None:
    api = commands.add_parser(
        "api",
        help=(
            "serve HTTP alone: the dashboard at /, /health, /api/rate-limiter/stats and /metrics"
            " (fleet-wide figures)"
        ),
    )
    api.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"port to listen on (default: PORT, else {DEFAULT_API_PORT}; 0 picks a free one)",
    )
    api.add_argument(
        "--host",
        type=_host,
        default=None,
        help="address to listen on (default: HTTP_HOST, else 127.0.0.1; 0.0.0.0 for all)",
    )
    api.set_defaults(handler=_api)
