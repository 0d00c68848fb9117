"""What `listener demo` runs against: the database (DATABASE_URL's, or an embedded PostgreSQL
started here) and OpenAI (a real key's, or the local stub started here, with the worker's
settings adjusted to it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from pydantic import SecretStr
from rich.console import Console

from listener.db import wrap
from listener.errors import ConfigurationError
from listener.settings import Settings

REAL_RPM, SCALE = 450, 8  # the stub's default budget: production's, scaled up
DEMO_LIMITER = "demo"  # the stub's limiter row: its budget must not spend a real fleet's slots


@dataclass
class Setup:
    conninfo: str
    embedded: bool
    database: str  # what the intro says about it


def describe_url(url: str) -> str:
    """host:port/dbname of a connection string, never its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigurationError("invalid setting DATABASE_URL: not a connection string") from None
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def prepare_database(args: argparse.Namespace, settings: Settings) -> Setup:
    """Start the embedded PostgreSQL if DATABASE_URL is unset, and migrate either database."""
    from listener.migrate import MigrationRunner

    if settings.database_url:
        url, embedded = settings.database_url, False
        where = f"DATABASE_URL ({describe_url(url)})"
    else:
        from listener.embedded import start_embedded

        url, embedded = start_embedded(args.data_dir), True
        where = f"an embedded PostgreSQL in {args.data_dir} (DATABASE_URL is unset)"
    applied = MigrationRunner(url, output=lambda _line: None).up()
    schema = f"{len(applied)} migration(s) applied" if applied else "schema up to date"
    return Setup(url, embedded, f"{where}, {schema}")


def execute(conninfo: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One statement on its own connection (sync: callers run it in a thread)."""
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    except psycopg.Error as error:
        raise wrap(error, "demo: a statement failed") from error


@asynccontextmanager
async def openai_settings(
    args: argparse.Namespace, settings: Settings, console: Console
) -> AsyncIterator[Settings]:
    """The worker's settings: the local stub's unless OPENAI_API_KEY is set."""
    if settings.openai_api_key is not None:
        rpm = args.rpm or settings.rate_limit_rpm
        console.print(
            f"  OpenAI:   OPENAI_API_KEY is set: {settings.openai_base_url or 'api.openai.com'}, "
            f"model {settings.openai_model}, {rpm:,} RPM. [bold]Real requests cost money[/bold]: "
            f"up to about {math.ceil(rpm * args.seconds / 60):,} in this run."
        )
        yield settings.model_copy(update={"rate_limit_rpm": rpm, "shutdown_grace_seconds": 5.0})
        return
    from listener.stub.server import StubConfig, run_stub

    rpm = args.rpm or REAL_RPM * SCALE
    scaled = f"{REAL_RPM} RPM scaled up ×{SCALE}" if rpm == REAL_RPM * SCALE else "--rpm"
    # The Batch API on a demo's clock: a batch is validated, run and finalised in seconds.
    config = StubConfig(
        rpm=rpm,
        latency=args.latency,
        batch_validating_seconds=0.2,
        batch_processing_seconds=1.0,
        batch_finalizing_seconds=0.2,
    )
    async with run_stub(config) as stub:
        console.print(
            f"  OpenAI:   a local stub at {stub.base_url} (OPENAI_API_KEY is unset), {rpm:,} RPM "
            f"({scaled}), {args.latency:g} s per answer"
        )
        # Enough workers to keep every slot busy while answers take `latency` seconds.
        concurrency = min(1000, math.ceil(rpm / 60 * (args.latency + 0.1)) + 8)
        yield settings.model_copy(
            update={
                "openai_api_key": SecretStr("stub"),
                "openai_base_url": stub.base_url,
                "rate_limit_rpm": rpm,
                "rate_limit_tpm": 0,
                "rate_limiter_name": DEMO_LIMITER,
                "worker_concurrency": concurrency,
                "shutdown_grace_seconds": 2.0,
                "batch_poll_seconds": 0.5,
            }
        )
