"""`python tests/batch_then_die.py CONNINFO STUB_URL N`: run the batch path pass after pass
(moving the stub's batch clock on after each) until every item is finished, and SIGKILL this
very process at the N-th checkpoint: right after a call to OpenAI returned or a commit (see
`listener.batches.context.Checkpoint`). N = 0: never; the process then exits 0 once every item
is finished. A real crash, as a deploy's killed container has."""

from __future__ import annotations

import os
import signal
import sys

import anyio
import httpx

from listener.assembly import served_app
from listener.batches.runner import BatchRunner
from listener.db import open_pool
from listener.registry import register_kinds
from listener.settings import load_settings

PASSES = 12
DONE = 7 * 3600.0  # the test's stub: every batch has ended by then


async def main() -> None:
    conninfo, stub_url, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    passed = 0

    def checkpoint(where: str) -> None:
        nonlocal passed
        passed += 1
        sys.stdout.write(f"{passed} {where}\n")
        sys.stdout.flush()
        if passed == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    settings = load_settings(
        database_url=conninfo,
        openai_api_key="test-key",
        openai_base_url=f"{stub_url}/v1",
        batch_max_requests=4,
        batch_max_per_store=4,
        batch_retry_seconds=0,
        retry_base_seconds=0.01,
        retry_cap_seconds=0.01,
    )
    app = served_app(settings)
    runner = next(s for s in app.services if isinstance(s, BatchRunner))
    runner.checkpoint = checkpoint
    pool = await open_pool(conninfo, settings, name="batch-then-die")
    try:
        await register_kinds(pool, app, settings.auto_rule)
        async with httpx.AsyncClient(base_url=stub_url) as control:
            for _ in range(PASSES):
                await runner.run_pass(pool, app)
                async with pool.connection() as conn:
                    cursor = await conn.execute(
                        "SELECT count(*) FROM job_items WHERE status IN ('PENDING', 'PROCESSING')"
                    )
                    row = await cursor.fetchone()
                if row == (0,):
                    return
                response = await control.post("/stub/batches/advance", json={"seconds": DONE})
                response.raise_for_status()
    finally:
        await app.aclose()
        await pool.close()
    sys.exit(f"items still open after {PASSES} passes ({passed} checkpoint(s))")


if __name__ == "__main__":
    anyio.run(main)
