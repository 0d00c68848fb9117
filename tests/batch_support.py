"""What the batch-path tests share: a stub, the served OpenAI kinds, a pool and the batch runner
driven one pass at a time (each pass: poll, collect, upload and submit), and the stub's batch
clock moved on by POST /stub/batches/advance."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from psycopg_pool import AsyncConnectionPool

from listener.assembly import served_app
from listener.batches.runner import BatchRunner
from listener.db import open_pool
from listener.handler import App
from listener.registry import register_kinds
from listener.settings import Settings
from listener.stub.server import RunningStub, StubConfig, run_stub
from tests.support import make_settings, query

HOUR = 3600.0
# Each status lasts an hour of the stub's batch clock: only `advance` moves a batch on, so a
# loaded machine cannot make one skip a status.
SLOW = {
    "batch_validating_seconds": HOUR,
    "batch_processing_seconds": 4 * HOUR,
    "batch_finalizing_seconds": HOUR,
    "batch_cancelling_seconds": HOUR,
}
DONE = 7 * HOUR  # a SLOW batch has ended by then


@dataclass
class BatchEnv:
    stub: RunningStub
    control: httpx.AsyncClient
    client: openai.AsyncOpenAI
    settings: Settings
    app: App
    pool: AsyncConnectionPool
    runner: BatchRunner

    async def run_pass(self) -> None:
        await self.runner.run_pass(self.pool, self.app)

    async def advance(self, seconds: float) -> None:
        response = await self.control.post("/stub/batches/advance", json={"seconds": seconds})
        response.raise_for_status()

    async def openai_batches(self) -> list[Any]:
        return [batch async for batch in self.client.batches.list(limit=100)]


def runner_of(app: App) -> BatchRunner:
    return next(service for service in app.services if isinstance(service, BatchRunner))


@asynccontextmanager
async def batch_env(
    database_url: str, config: StubConfig | None = None, **overrides: Any
) -> AsyncIterator[BatchEnv]:
    values = {"batch_retry_seconds": 0, "retry_base_seconds": 0.01, "retry_cap_seconds": 0.01}
    values.update(overrides)
    async with (
        run_stub(config or StubConfig(**SLOW)) as stub,  # type: ignore[arg-type]
        httpx.AsyncClient(base_url=stub.url) as control,
        openai.AsyncOpenAI(base_url=stub.base_url, api_key="test", max_retries=0) as client,
    ):
        settings = make_settings(stub.base_url, **values)
        app = served_app(settings)
        pool = await open_pool(database_url, settings, name="test-batch")
        try:
            await register_kinds(pool, app, settings.auto_rule)
            yield BatchEnv(stub, control, client, settings, app, pool, runner_of(app))
        finally:
            await app.aclose()
            await pool.close()


def products(count: int, prefix: str = "Product", marker: str = "") -> list[dict[str, Any]]:
    return [{"id": f"sku-{n}", "name": f"{prefix} {n}{marker}"} for n in range(count)]


async def items_by_status(conninfo: str, job_id: int) -> dict[str, int]:
    rows = await query(
        conninfo,
        "SELECT status, count(*) FROM job_items WHERE job_id = %s GROUP BY status",
        (job_id,),
    )
    return {str(status): int(count) for status, count in rows}


async def batch_rows(conninfo: str) -> list[tuple[Any, ...]]:
    return await query(
        conninfo,
        "SELECT id, state, status, outcome, request_count, openai_batch_id, last_error"
        " FROM openai_batches ORDER BY id",
    )


async def job_status(conninfo: str, job_id: int) -> tuple[str, bool]:
    ((status, finished),) = await query(
        conninfo, "SELECT status, completed_at IS NOT NULL FROM jobs WHERE id = %s", (job_id,)
    )
    return str(status), bool(finished)


def ids(rows: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [row[0] for row in rows]
