"""The storage contract of the durable idempotency layer: narrow primitives, all policy elsewhere."""

from __future__ import annotations

import abc
import contextlib

from .record import IdempotencyRecord


class IdempotencyStore(abc.ABC):
    """Where idempotency records live.

    A backend implements a few atomic primitives on one key each; the layers above own the policy (keys,
    fingerprints, encoding, leases, heartbeats, waiting, takeover). ``strands_py.testing.StoreContract`` holds the
    suite a backend must pass.

    No primitive judges whether an owner is alive: that is the caller's, by watching versions (see
    ``IdempotencyRecord``). A store compares versions and owners, and expires ``COMPLETED`` records by ``expires_at``;
    it may delete an ``IN_PROGRESS`` record past its ``expires_at`` (garbage collection, measured on the store's own
    clock or the reader's; the owner of a running claim moves it forward at every heartbeat).

    Every primitive is a coroutine. A backend doing blocking I/O runs it on an executor of its own, never on the
    event loop's default executor (that pool belongs to the model calls). Implementations must be safe to call
    from several threads and event loops at once.

    Errors: a store that cannot be reached, times out or answers with an error raises ``IdempotencyStoreError``
    with the original error chained (nothing was decided; retrying later is safe). A stored record that cannot be
    decoded raises ``IdempotencyRecordCorruptedError``. A failed condition is never an error: it is the return
    value (the record in the way for ``claim``, False for the conditional writes).

    Cancellation: cancelling a call stops the caller waiting; a write already sent may still take effect. That is
    safe by construction: the layers above hand back a claim whose caller gave up, and every other write is
    conditional (fenced on the owner, or on the version the caller judged).

    Journal (optional, ``supports_journal``): a key's ``IN_PROGRESS`` record may carry an append-only list of
    entries (the steps its owners completed), written only by the record's owner. It lives as long as the claim's
    lineage: a ``take_over`` keeps it (the new owner resumes from it), while a fresh ``claim``, ``complete`` and
    ``release`` drop it, as does the record's expiry.

    Attributes:
        max_result_bytes: Largest encoded result the store accepts, or None for no limit.
        supports_blocking_claims: Whether ``claim_blocking`` is implemented (optional; the sync ``agent(...)``
            answers replays with it before starting a thread and an event loop).
        supports_journal: Whether ``append``, ``journal`` and ``truncate`` are implemented (needed by
            ``IdempotencyConfig(journal=True)``).
        supports_cancel: Whether ``cancel`` is implemented (cancelling a run from anywhere).
        max_journal_entry_bytes: Largest journal entry the store accepts, or None for no limit (larger steps are
            split into several entries by the layer above).
    """

    max_result_bytes: int | None = None
    supports_blocking_claims: bool = False
    supports_journal: bool = False
    supports_cancel: bool = False
    max_journal_entry_bytes: int | None = None

    @abc.abstractmethod
    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Store ``record`` (``IN_PROGRESS``) if the key is free; one atomic conditional write.

        The key is free when it holds nothing, a ``COMPLETED`` record that expired at ``now``
        (``record.expired(now)``), a ``CANCELLED`` tombstone, or an ``IN_PROGRESS`` record of the same owner (a claim
        retried after its first attempt landed and its response was lost is still the caller's own). Any other
        ``IN_PROGRESS`` record blocks the claim whatever its age: only ``take_over`` replaces another owner's claim.

        Args:
            record: The claim; ``record.owner`` is unique to the invocation, ``record.version`` to this write.
            now: The caller's wall clock (``time.time()``), against which ``COMPLETED`` records' expiry is compared.

        Returns:
            None if ``record`` was stored (the caller owns the key), else the record that prevented it.
        """

    @abc.abstractmethod
    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """Replace the record under ``record.key`` with ``record``, only if the stored record's version is ``version``.

        The compare-and-set of a takeover: the caller judged the record with that version abandoned (it saw the same
        version for a whole lease) or yielded, and replaces exactly that record, or nothing. A key that holds another
        version, or nothing at all, is not written: the caller starts over from a fresh read.

        Returns:
            False if the stored record is not the one the caller judged.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> IdempotencyRecord | None:
        """Return the record stored under ``key`` (a strongly consistent read), or None.

        An ``IN_PROGRESS`` record is returned until it is released, replaced, or deleted past its ``expires_at``. A
        ``COMPLETED`` record past its ``expires_at`` may be returned or not (a store may drop it on read, or its server
        may have deleted it).
        """

    @abc.abstractmethod
    async def complete(self, record: IdempotencyRecord) -> bool:
        """Replace the owner's ``IN_PROGRESS`` record with ``record`` (a result, or a tombstone), fenced on the owner.

        ``record`` is ``COMPLETED`` (the result) or ``CANCELLED`` (how a cancelled run ends).

        Written only if ``record.owner`` still owns the ``IN_PROGRESS`` record, and, when that record is marked
        ``cancelled``, only a ``CANCELLED`` tombstone (a result can never land after a cancel was asked for).

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
    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        """A heartbeat: give the owner's ``IN_PROGRESS`` record a new version, fenced on the owner like complete.

        Sets the record's ``version``, ``lease_seconds`` (0 yields the record: see ``IdempotencyRecord``) and
        ``expires_at``; when ``checkpoint`` is not None, stores it too (None keeps the stored checkpoint). Payload and
        fingerprint are untouched.

        Returns:
            False if the renewal was fenced off: the claim was taken over, completed, is gone, or is marked
            ``cancelled`` (its owner learns of the cancel this way, at its next heartbeat).
        """

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        """Mark the ``IN_PROGRESS`` record under ``key`` ``cancelled``, whoever owns it; one atomic write (optional).

        A record in another state, or none, is left as it is. Marking twice is marking once.

        Returns:
            The record under ``key`` after the call (the marked claim, a finished record, or None).

        Raises:
            NotImplementedError: The store does not support cancels (``supports_cancel`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support cancels")

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """``claim``, blocking the calling thread: for a caller without an event loop (optional).

        Same atomic write, same result and errors as ``claim``. Implemented where ``supports_blocking_claims`` is
        True. Never call it on an event loop's thread: it blocks for a network round trip.

        Raises:
            NotImplementedError: The store does not support it (``supports_blocking_claims`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support blocking claims")

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """Append ``entry`` to the journal of ``key``, fenced on ``owner`` holding its ``IN_PROGRESS`` record.

        One atomic step: the fence and the append (an entry is never written for an owner that lost the claim).

        Returns:
            False if the append was fenced off (the claim was taken over, completed, released, is gone, or is marked
            ``cancelled``).

        Raises:
            NotImplementedError: The store does not support journals (``supports_journal`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support journals")

    async def journal(self, key: str) -> list[bytes]:
        """The journal of ``key``, in append order (empty when there is none).

        Raises:
            NotImplementedError: The store does not support journals (``supports_journal`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support journals")

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """Keep only the first ``length`` entries of the journal of ``key``, fenced like ``append``.

        Returns:
            False if fenced off.

        Raises:
            NotImplementedError: The store does not support journals (``supports_journal`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support journals")

    def use_event_loop(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Serve the running event loop's calls the way that suits a loop that lives long, until the block ends.

        For a loop that lives as long as a server does: the lifespans of ``AgentApp`` and ``A2AApp`` enter it. Calls
        made on other loops are served as before. The default does nothing; ``RedisIdempotencyStore`` makes its
        calls with a redis-py asyncio client of the loop's own instead of on its threads. Use it as
        ``async with store.use_event_loop(): ...``.
        """
        return contextlib.nullcontext()
