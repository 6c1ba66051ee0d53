"""``InMemoryIdempotencyStore``: the embedded default, for one process."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading
import time
from collections import OrderedDict

from ..types.exceptions import IdempotencyStoreError
from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState

# The heap of expiry deadlines keeps stale entries (records since replaced or removed) until they reach its top; it
# is rebuilt from the live records when it holds twice as many entries as there are records (plus this slack), so a
# rebuild costs O(n) once per n writes: O(1) amortised.
_HEAP_SLACK = 64


class InMemoryIdempotencyStore(IdempotencyStore):
    """Records in this process, with expiry and a bound on entries that never evicts a running claim.

    Shared by every agent given the same instance (records are namespaced by scope). It deduplicates retries
    that reach this process only; use ``DynamoDBIdempotencyStore`` or ``RedisIdempotencyStore`` behind a load
    balancer. No I/O, so its primitives run inline without an executor.

    Expiry: a ``COMPLETED`` record past its ``expires_at`` (the caller's ``now`` for a claim, this process's wall
    clock for a read) is dropped when met. An ``IN_PROGRESS`` record is garbage-collected once its ``expires_at``
    has passed, measured as a duration from its last write on this process's monotonic clock: a wall clock that
    steps, or a caller whose ``now`` runs ahead, never removes a running claim.

    Eviction, when a claim for a new key finds ``max_entries`` records held:

    1. every expired ``COMPLETED`` record goes first;
    2. otherwise the least recently used ``COMPLETED`` record (claimed or read most long ago): its token simply
       runs again on its next retry;
    3. otherwise the ``IN_PROGRESS`` record written longest ago, if its owner has not renewed it for a whole lease
       (by this process's monotonic clock: the store sees every write, so it needs no watching), yielded it, or it
       is past its expiry: a waiter would take it over anyway;
    4. a live ``IN_PROGRESS`` claim is never evicted: evicting it would let a retry run the agent, and its tools,
       a second time while the first run is still going. When every record is a live claim, ``claim`` raises
       ``IdempotencyStoreError`` ("store is full of running claims; raise max_entries"): the new invocation does
       not run, and its caller may retry later, exactly as if a shared store were unreachable.

    Cost: O(log n) per write and O(1) per read on the hot path; running claims (in order of their last write) and
    completed records (least recently used first) are kept apart and expiry deadlines in a heap, so making room
    never scans the records.

    Thread-safety: one lock guards the records; safe from any thread and event loop. Cancellation: the primitives
    never suspend, so a cancelled call either ran entirely or not at all.
    """

    def __init__(self, *, max_entries: int = 10_000, max_result_bytes: int | None = None) -> None:
        """Create a store.

        Args:
            max_entries: Most records kept (running claims included); see the class docstring for what is evicted
                beyond it.
            max_result_bytes: Largest encoded result stored; None for no limit.

        Raises:
            ValueError: ``max_entries`` or ``max_result_bytes`` is not positive.
        """
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if max_result_bytes is not None and max_result_bytes < 1:
            raise ValueError(f"max_result_bytes must be positive, got {max_result_bytes}")
        self.max_entries = max_entries
        self.max_result_bytes = max_result_bytes
        self._claims: OrderedDict[str, _Claim] = OrderedDict()  # oldest write first
        self._journals: dict[str, list[bytes]] = {}  # of IN_PROGRESS records only
        self._completed: OrderedDict[str, IdempotencyRecord] = OrderedDict()  # least recently used first
        # Completed records' (expires_at, tie-breaker, key, the record the entry was pushed for)
        self._deadlines: list[tuple[float, int, str, IdempotencyRecord]] = []
        self._sequence = itertools.count()
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        """Number of records held (expired ones included until read or evicted)."""
        return len(self._claims) + len(self._completed)

    supports_blocking_claims = True
    supports_journal = True
    supports_cancel = True

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``.

        Raises:
            IdempotencyStoreError: The key is new and every one of the ``max_entries`` records is a live claim.
        """
        return self.claim_blocking(record, now)

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``, which never blocks for long here (one lock)."""
        with self._mutex:
            existing = self._lookup(record.key, now)
            if existing is not None and not _free(existing, now) and not _own_claim(existing, record.owner):
                if existing.state is RecordState.COMPLETED:
                    self._completed.move_to_end(record.key)
                return existing
            if existing is None and len(self) >= self.max_entries:
                self._make_room(now)
            if existing is None or not _own_claim(existing, record.owner):
                self._journals.pop(record.key, None)  # a fresh claim starts a fresh journal
            elif existing.cancelled:
                # Our own claim, resent after its reply was lost, met a cancel that landed in between: keep the mark.
                record = dataclasses.replace(record, cancelled=True)
            self._put(record)
            return None

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """See ``IdempotencyStore.take_over``."""
        with self._mutex:
            existing = self._lookup(record.key, time.time())
            if existing is None or existing.version != version:
                return False
            self._put(record)
            return True

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``; a record past its ``expires_at`` is dropped on read."""
        with self._mutex:
            record = self._lookup(key, time.time())
            if record is not None and record.state is RecordState.COMPLETED:
                self._completed.move_to_end(key)
            return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``."""
        with self._mutex:
            existing = self._owned_in_progress(record.key, record.owner)
            if existing is None or (existing.cancelled and record.state is not RecordState.CANCELLED):
                return False
            self._journals.pop(record.key, None)
            self._put(record)
            return True

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``."""
        with self._mutex:
            if self._owned_in_progress(key, owner) is None:
                return False
            self._remove(key)
            return True

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """See ``IdempotencyStore.append``."""
        with self._mutex:
            if self._running(key, owner) is None:
                return False
            self._journals.setdefault(key, []).append(bytes(entry))
            return True

    async def journal(self, key: str) -> list[bytes]:
        """See ``IdempotencyStore.journal``."""
        with self._mutex:
            if self._lookup(key, time.time()) is None:
                return []
            return list(self._journals.get(key, ()))

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """See ``IdempotencyStore.truncate``."""
        with self._mutex:
            if self._running(key, owner) is None:
                return False
            entries = self._journals.get(key)
            if entries is not None:
                del entries[length:]
            return True

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
        """See ``IdempotencyStore.renew``."""
        with self._mutex:
            existing = self._running(key, owner)
            if existing is None:
                return False
            renewed = dataclasses.replace(
                existing,
                version=version,
                lease_seconds=lease_seconds,
                expires_at=expires_at,
                checkpoint=existing.checkpoint if checkpoint is None else checkpoint,
            )
            self._put(renewed)
            return True

    # The helpers below run with ``_mutex`` held.

    def _lookup(self, key: str, now: float) -> IdempotencyRecord | None:
        """The record under ``key``, dropping it if it expired (see the class docstring for which clock decides)."""
        claim = self._claims.get(key)
        if claim is not None:
            if time.monotonic() < claim.collect_at:
                return claim.record
            self._remove(key)
            return None
        record = self._completed.get(key)
        if record is not None and record.expired(now):
            self._remove(key)
            return None
        return record

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.cancel``."""
        with self._mutex:
            existing = self._lookup(key, time.time())
            if existing is None or existing.state is not RecordState.IN_PROGRESS or existing.cancelled:
                return existing
            marked = dataclasses.replace(existing, cancelled=True)
            claim = self._claims[key]
            claim.record = marked  # the owner's last write stays the last write: a mark is no heartbeat
            return marked

    def _running(self, key: str, owner: str) -> IdempotencyRecord | None:
        """The fence of renew and the journal: the owner's ``IN_PROGRESS`` record, unless it is marked cancelled."""
        existing = self._owned_in_progress(key, owner)
        return None if existing is None or existing.cancelled else existing

    def _owned_in_progress(self, key: str, owner: str) -> IdempotencyRecord | None:
        """The fence of complete, release and renew: the owner's ``IN_PROGRESS`` record, or None."""
        claim = self._claims.get(key)
        return claim.record if claim is not None and claim.record.owner == owner else None

    def _put(self, record: IdempotencyRecord) -> None:
        """Store ``record`` under its key (replacing any, keeping its journal), most recently written."""
        if self._claims.pop(record.key, None) is None:
            self._completed.pop(record.key, None)
        if record.state is RecordState.IN_PROGRESS:
            self._claims[record.key] = _Claim(record)
            return
        self._completed[record.key] = record
        heapq.heappush(self._deadlines, (record.expires_at, next(self._sequence), record.key, record))
        if len(self._deadlines) > 2 * len(self._completed) + _HEAP_SLACK:
            self._deadlines = [(r.expires_at, next(self._sequence), k, r) for k, r in self._completed.items()]
            heapq.heapify(self._deadlines)

    def _remove(self, key: str) -> None:
        """Forget ``key`` (and its journal); its heap entries go stale and are skipped when they surface."""
        if self._claims.pop(key, None) is None:
            self._completed.pop(key, None)
        self._journals.pop(key, None)

    def _make_room(self, now: float) -> None:
        """Free at least one entry for a new key, or raise: see the eviction order in the class docstring."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key, record = heapq.heappop(deadlines)
            # An entry whose record was replaced since (claimed again, removed) is stale: skip it.
            if self._completed.get(key) is record:
                self._remove(key)
        if len(self) < self.max_entries:
            return
        if self._completed:
            self._completed.popitem(last=False)
            return
        key, oldest = next(iter(self._claims.items()))
        if oldest.abandoned():
            self._remove(key)
            return
        raise IdempotencyStoreError(
            f"in-memory idempotency store is full of running claims ({len(self._claims)} live IN_PROGRESS records, "
            f"max_entries={self.max_entries}); raise max_entries"
        )


class _Claim:
    """An ``IN_PROGRESS`` record and when, on this process's monotonic clock, it was written and may be collected."""

    __slots__ = ("collect_at", "record", "written_at")

    def __init__(self, record: IdempotencyRecord) -> None:
        self.record = record
        self.written_at = time.monotonic()
        # expires_at as a duration from this write: immune to wall-clock steps and to callers' clocks.
        self.collect_at = self.written_at + max(0.0, record.expires_at - time.time())

    def abandoned(self) -> bool:
        """Whether nobody could object to evicting it: yielded, silent for a whole lease, or past its expiry."""
        now = time.monotonic()
        return self.record.yielded or now - self.written_at >= self.record.lease_seconds or now >= self.collect_at


def _free(existing: IdempotencyRecord, now: float) -> bool:
    """Whether a claim may replace ``existing``: an expired result, or a tombstone of a cancelled run."""
    return existing.state is RecordState.CANCELLED or existing.expired(now)


def _own_claim(existing: IdempotencyRecord, owner: str) -> bool:
    return existing.state is RecordState.IN_PROGRESS and existing.owner == owner
