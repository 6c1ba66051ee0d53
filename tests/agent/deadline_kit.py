"""A deadline for a block of test code that drives (and closes) a stream in its own task, on every supported Python."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout`` where it exists (3.11+); on 3.10, a timer that cancels this very task at the deadline."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            yield
        return
    task = asyncio.current_task()
    assert task is not None
    timer = asyncio.get_running_loop().call_later(seconds, task.cancel)
    try:
        yield
    finally:
        timer.cancel()
