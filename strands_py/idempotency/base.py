"""The storage contract of the durable idempotency layer: four primitives, all policy elsewhere."""

from __future__ import annotations

import abc

from .record import IdempotencyRecord


class IdempotencyStore(abc.ABC):
    """Where idempotency records live.

    A backend implements four primitives; ``record.py`` and ``_durable.py`` own the policy (keys, fingerprints,
    encoding, leases, waiting).

    Every primitive is a coroutine. A backend doing blocking I/O runs it on an executor of its own, never on the
    event loop's default executor (that pool belongs to the model calls). Implementations must be safe to call
    from several threads and event loops at once.

    Cancellation: cancelling a call stops the caller waiting; a write already sent may still take effect. That is
    safe by construction: an orphaned claim expires with its lease, and complete / release are fenced on the owner.

    Attributes:
        max_result_bytes: Largest encoded result the store accepts, or None for no limit.
    """

    max_result_bytes: int | None = None

    @abc.abstractmethod
    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Store ``record`` (``IN_PROGRESS``) unless a live record has its key; one atomic conditional write.

        A record that has expired, or an ``IN_PROGRESS`` record whose lease has lapsed, is not live and is replaced.

        Returns:
            None if ``record`` was stored (the caller owns the key), else the live record that prevented it.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> IdempotencyRecord | None:
        """Return the record stored under ``key``, live or not, or None."""

    @abc.abstractmethod
    async def complete(self, record: IdempotencyRecord) -> bool:
        """Replace the owner's ``IN_PROGRESS`` record with ``record`` (``COMPLETED``), fenced on the owner.

        Written only if ``record.owner`` still owns the ``IN_PROGRESS`` record.

        Returns:
            False if the write was fenced off: the claim was taken over (or removed) meanwhile.
        """

    @abc.abstractmethod
    async def release(self, key: str, owner: str) -> bool:
        """Delete the ``IN_PROGRESS`` record under ``key`` only if ``owner`` still owns it, so a retry can run.

        Returns:
            False if the delete was fenced off.
        """
