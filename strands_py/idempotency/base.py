"""The storage contract of the durable idempotency layer: five primitives, all policy elsewhere."""

from __future__ import annotations

import abc

from .record import IdempotencyRecord


class IdempotencyStore(abc.ABC):
    """Where idempotency records live.

    A backend implements five primitives; ``keys.py``, ``codec.py`` and ``_durable.py`` own the policy (keys,
    fingerprints, encoding, leases, heartbeats, waiting). ``strands_py.testing.store_contract`` holds the suite a
    backend must pass.

    Every primitive is a coroutine. A backend doing blocking I/O runs it on an executor of its own, never on the
    event loop's default executor (that pool belongs to the model calls). Implementations must be safe to call
    from several threads and event loops at once.

    Errors: a store that cannot be reached, times out or answers with an error raises ``IdempotencyStoreError``
    with the original error chained (nothing was decided; retrying later is safe). A stored record that cannot be
    decoded raises ``IdempotencyRecordCorruptedError``. A failed condition is never an error: it is the return
    value (the live record for ``claim``, False for the fenced writes).

    Cancellation: cancelling a call stops the caller waiting; a write already sent may still take effect. That is
    safe by construction: an orphaned claim expires with its lease, and complete / release / renew are fenced on
    the owner.

    Attributes:
        max_result_bytes: Largest encoded result the store accepts, or None for no limit.
        supports_blocking_claims: Whether ``claim_blocking`` is implemented (optional; the sync ``agent(...)``
            answers replays with it before starting a thread and an event loop).
    """

    max_result_bytes: int | None = None
    supports_blocking_claims: bool = False

    @abc.abstractmethod
    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Store ``record`` (``IN_PROGRESS``) unless a live record has its key; one atomic conditional write.

        A record that has expired, or an ``IN_PROGRESS`` record whose lease has lapsed, is not live and is replaced.
        A live ``IN_PROGRESS`` record of the same owner is replaced too: a claim retried after its first attempt
        landed (the response was lost) is still the caller's own claim.

        Args:
            record: The claim; ``record.owner`` is unique to the invocation.
            now: The caller's clock (``time.time()``), against which leases and expiry are compared.

        Returns:
            None if ``record`` was stored (the caller owns the key), else the live record that prevented it.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> IdempotencyRecord | None:
        """Return the record stored under ``key`` (a strongly consistent read), or None.

        A record past its ``expires_at`` may be returned or not (a store may drop it on read, or its server may
        have deleted it); a lapsed ``IN_PROGRESS`` claim is returned.
        """

    @abc.abstractmethod
    async def complete(self, record: IdempotencyRecord) -> bool:
        """Replace the owner's ``IN_PROGRESS`` record with ``record`` (``COMPLETED``), fenced on the owner.

        Written only if ``record.owner`` still owns the ``IN_PROGRESS`` record.

        Returns:
            False if the write was fenced off: the claim was taken over (or removed, or completed) meanwhile.
        """

    @abc.abstractmethod
    async def release(self, key: str, owner: str) -> bool:
        """Delete the ``IN_PROGRESS`` record under ``key`` only if ``owner`` still owns it, so a retry can run.

        Returns:
            False if the delete was fenced off.
        """

    @abc.abstractmethod
    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        """Extend the owner's lease on its ``IN_PROGRESS`` record (a heartbeat), fenced on the owner like complete.

        Sets the record's ``lease_expires_at``; raises its ``expires_at`` to at least ``lease_expires_at`` (never
        lowers it), so a long run's claim does not expire under it; when ``checkpoint`` is not None, stores it too
        (None keeps the stored checkpoint). Payload and fingerprint are untouched.

        Returns:
            False if the renewal was fenced off: the claim was taken over, completed, or is gone.
        """

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """``claim``, blocking the calling thread: for a caller without an event loop (optional).

        Same atomic write, same result and errors as ``claim``. Implemented where ``supports_blocking_claims`` is
        True. Never call it on an event loop's thread: it blocks for a network round trip.

        Raises:
            NotImplementedError: The store does not support it (``supports_blocking_claims`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support blocking claims")
