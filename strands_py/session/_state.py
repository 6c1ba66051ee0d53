"""What a session's lock record says about its conversation, read without taking the lock (for status pages).

A read, never a judgement: a holder that stopped renewing still looks ``held`` here until a waiter, watching its
version for a whole lease, takes the lock over (see ``_lock.py``). Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..idempotency._calls import _store
from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord, RecordState
from ._checkpoint import pending_of, read_checkpoint


@dataclass(frozen=True)
class SessionLockState:
    """A session's lock as its record stands.

    Attributes:
        held: A turn holds the session (an ``IN_PROGRESS`` lock record that was not yielded).
        token_key: The durable key of the turn the record names (the running turn's, or the last one's when the
            record was yielded), or None (a turn without a token, or no record).
        lease_seconds: The holder's lease (0 when not held).
        unjudged: The record was left by a turn whose outcome the next holder decides (it yielded mid-turn, or it
            carries a turn to roll back): the conversation may still lose that turn's messages.
    """

    held: bool
    token_key: str | None = None
    lease_seconds: float = 0.0
    unjudged: bool = False


def lock_state(record: IdempotencyRecord | None) -> SessionLockState:
    """The state a session's lock record (or its absence) says."""
    if record is None or record.state is not RecordState.IN_PROGRESS:
        return SessionLockState(held=False)
    document = read_checkpoint(record.checkpoint)
    token = document.get("token")
    token_key = token if isinstance(token, str) and token else None
    if record.yielded:
        # A yielded record either marks a finished turn that counts, or names a turn for the next holder to judge.
        unjudged = pending_of(record) is not None or ("messages" in document and not document.get("committed"))
        return SessionLockState(held=False, token_key=token_key, unjudged=unjudged)
    return SessionLockState(held=True, token_key=token_key, lease_seconds=record.lease_seconds)


async def read_lock_state(store: IdempotencyStore, lock_key: str) -> SessionLockState:
    """Read the lock record ``lock_key`` (one ``get``) and say what it holds.

    Raises:
        IdempotencyStoreError: The store failed.
        IdempotencyRecordCorruptedError: The record cannot be decoded.

    Cancellation: cancelling stops the read only. Thread-safety: any thread and loop, as the store allows.
    """
    return lock_state(await _store(store.get(lock_key)))
