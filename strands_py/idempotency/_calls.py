"""How the layers above call a store: errors reported alike, and writes that outlive a cancelled caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..types.exceptions import IdempotencyError, IdempotencyStoreError
from .base import IdempotencyStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Store work that outlives a cancelled caller (handing back a claim, storing a decided result); referenced until done.
_background: set[asyncio.Future[Any]] = set()


async def _store(call: Awaitable[T]) -> T:
    """Await a store primitive; anything but our own errors becomes ``IdempotencyStoreError`` (cause chained)."""
    try:
        return await call
    except (IdempotencyError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise IdempotencyStoreError(f"idempotency store failed: {type(e).__name__}: {e}") from e


def _forget(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Its caller was cancelled and is gone; what failed was logged where it failed (or is a fenced-off write).
        logger.debug("error=<%s> | store work left behind by a cancelled caller failed", type(task.exception()))


def keep(work: Awaitable[T]) -> asyncio.Future[T]:
    """Run ``work`` as a task referenced until it ends (a task nobody references may be collected mid-way)."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


async def shielded(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if our caller is cancelled meanwhile (it then finishes in the background).

    For store writes whose outcome is already decided: a cancellation between sending a write and hearing back must
    not leave the other half undone (a result stored but its turn rolled back; a claim nobody will hand back).
    """
    return await asyncio.shield(keep(work))


async def claim_or_hand_back(
    attempt: Awaitable[T],
    landed: Callable[[T], bool],
    hand_back: Callable[[], Awaitable[None]],
) -> T:
    """Await a claiming write (``claim``, ``take_over``), calling ``hand_back`` whenever it may have landed unused.

    That is: our caller is cancelled while the write is in flight (``hand_back`` runs once the write is done, if
    ``landed(outcome)`` says it took effect), or the call fails after the write may have been applied (a read
    timeout, a connection reset: the write is handed back before the error is raised). Either way an
    ``IN_PROGRESS`` record nobody renews would otherwise block every retry for a whole lease. ``hand_back`` must be
    fenced on the claim's owner and must never raise.

    Raises:
        IdempotencyStoreError: The store failed (our write, if it landed, has been handed back).
    """
    future = asyncio.ensure_future(_store(attempt))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        keep(_hand_back_when_landed(future, landed, hand_back))
        raise
    except Exception:
        await shielded(hand_back())
        raise


async def _hand_back_when_landed(
    attempt: asyncio.Future[T], landed: Callable[[T], bool], hand_back: Callable[[], Awaitable[None]]
) -> None:
    try:
        took_effect = landed(await attempt)
    except Exception:  # noqa: BLE001 - a failed write may have been applied all the same
        took_effect = True
    except asyncio.CancelledError:  # the loop is being torn down: nothing can be sent any more
        return
    if took_effect:
        logger.debug("caller gave up during its claim, handing the claim back")
        await hand_back()


async def release_quietly(store: IdempotencyStore, key: str, owner: str) -> None:
    """Release ``owner``'s claim on ``key`` so a retry runs at once; never raises (a silent claim is taken over)."""
    try:
        if not await store.release(key, owner):
            logger.debug("key=<%s> | claim was no longer ours to release", key)
    except Exception:
        logger.exception("key=<%s> | could not release the claim; it is taken over after a lease", key)
