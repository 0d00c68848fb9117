"""Issue 27: the fleet SIGKILLed at any moment of a batch's life loses nothing, does nothing
twice and creates no batch twice. The batch path runs in a real process killed right after each
call to OpenAI and each commit in turn (`batch_then_die.py`); a second process then finishes the
work, and every item is COMPLETED exactly once, with one OpenAI batch per batch row of ours."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import openai
import pytest
from openai.types import Batch

from listener import enqueue
from listener.stub.server import RunningStub, StubConfig, run_stub
from tests.batch_support import SLOW, products
from tests.support import SLACK, install_write_audit, outcome_writes, query

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "batch_then_die.py"
# Two stores' 6 items, 4 a file: two batches, so a crash also falls between them. The run has
# this many checkpoints (tests/batch_then_die.py prints them; test_the_run_has_its_checkpoints).
CHECKPOINTS = 22


def _run(conninfo: str, stub: RunningStub, kill_after: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), conninfo, stub.url, str(kill_after)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120 * SLACK,
        check=False,
    )


async def _jobs(conninfo: str) -> list[int]:
    await install_write_audit(conninfo)
    return [
        enqueue(conninfo, "import", products(4), tier="batch"),
        enqueue(conninfo, "small", products(2, "Mug"), tier="batch"),
    ]


async def test_the_run_has_its_checkpoints(database_url: str) -> None:
    async with run_stub(StubConfig(**SLOW)) as stub:
        await _jobs(database_url)
        done = await anyio.to_thread.run_sync(_run, database_url, stub, 0)
    assert done.returncode == 0, done.stderr
    steps = [line.split(" ", 1)[1] for line in done.stdout.splitlines()]
    assert len(steps) == CHECKPOINTS, steps
    assert steps.count("api:batches.create") == 2


@pytest.mark.parametrize("kill_after", range(1, CHECKPOINTS + 1))
async def test_killed_at_any_checkpoint_the_next_run_finishes_every_item_once(
    database_url: str, kill_after: int
) -> None:
    async with run_stub(StubConfig(**SLOW)) as stub:
        jobs = await _jobs(database_url)
        killed = await anyio.to_thread.run_sync(_run, database_url, stub, kill_after)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        where = killed.stdout.splitlines()[-1]
        done = await anyio.to_thread.run_sync(_run, database_url, stub, 0)
        assert done.returncode == 0, (where, done.stderr)
        batches = [b async for b in stub_batches(stub)]
    statuses = await query(database_url, "SELECT DISTINCT status FROM job_items")
    assert statuses == [("COMPLETED",)], where
    writes = await outcome_writes(database_url)
    assert set(writes.values()) == {1} and len(writes) == 6, (where, writes)
    for job in jobs:
        assert await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job,)) == [
            ("COMPLETED",)
        ]
    ours = await query(
        database_url,
        "SELECT id, openai_batch_id FROM openai_batches WHERE openai_batch_id IS NOT NULL",
    )
    per_row = Counter((b.metadata or {}).get("listener_batch_id") for b in batches)
    assert set(per_row.values()) == {1}, (where, per_row)  # no batch created twice
    assert sorted(b.id for b in batches) == sorted(openai_id for _id, openai_id in ours), where


async def stub_batches(stub: RunningStub) -> AsyncIterator[Batch]:
    """Every batch the stub was asked to create (batches.list pages through them all)."""
    async with openai.AsyncOpenAI(base_url=stub.base_url, api_key="t", max_retries=0) as client:
        async for batch in client.batches.list(limit=100):
            yield batch
