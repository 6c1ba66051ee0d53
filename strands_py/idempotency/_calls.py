"""One way to await a store primitive, so that every caller reports store failures alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from ..types.exceptions import IdempotencyError, IdempotencyStoreError

T = TypeVar("T")


async def _store(call: Awaitable[T]) -> T:
    """Await a store primitive; anything but our own errors becomes ``IdempotencyStoreError`` (cause chained)."""
    try:
        return await call
    except (IdempotencyError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise IdempotencyStoreError(f"idempotency store failed: {type(e).__name__}: {e}") from e
