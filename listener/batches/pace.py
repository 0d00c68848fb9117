"""The batch path's CPU and database work, paced: it shares a process (and a database) with
real-time claims, whose first item must not wait behind 50,000 lines being checked or written.

Work runs in slices, each in a thread (the event loop keeps serving claims), followed by a rest
as long as the slice took, times (1 - DUTY) / DUTY: at most DUTY of the time goes to the batch
path while it has work. A batch's answers arrive within 24 hours; a second more to write them
costs nothing, while the same second taken from a store's first item is what the real-time
tier is for (bench.batch_tier measures both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")

DUTY = 0.5
SLICE = 500


async def rest(began: float) -> None:
    """Rest after a slice of work begun at `began` (time.monotonic())."""
    spent = time.monotonic() - began
    await anyio.sleep(spent * (1 - DUTY) / DUTY)


async def paced(
    work: Callable[[Sequence[T]], list[R]], values: Sequence[T], size: int = SLICE
) -> list[R]:
    """`work` over `values`, `size` at a time, each slice in a thread and followed by a rest."""
    done: list[R] = []
    for start in range(0, len(values), size):
        began = time.monotonic()
        done.extend(await anyio.to_thread.run_sync(work, values[start : start + size]))
        await rest(began)
    return done
