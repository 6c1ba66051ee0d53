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

# The heap of deadlines keeps stale entries (records since replaced or removed) until they reach its top; it is
# rebuilt from the live records when it holds twice as many entries as there are records (plus this slack), so a
# rebuild costs O(n) once per n writes: O(1) amortised.
_HEAP_SLACK = 64


class InMemoryIdempotencyStore(IdempotencyStore):
    """Records in this process, with expiry and a bound on entries that never evicts a running claim.

    Shared by every agent given the same instance (records are namespaced by scope). It deduplicates retries
    that reach this process only; use ``DynamoDBIdempotencyStore`` or ``RedisIdempotencyStore`` behind a load
    balancer. No I/O, so its primitives run inline without an executor.

    Eviction, when a claim for a new key finds ``max_entries`` records held:

    1. every record that no longer decides anything goes first: expired records, and ``IN_PROGRESS`` claims whose
       lease lapsed (their owner is presumed dead; a retry would take them over anyway);
    2. otherwise the least recently used ``COMPLETED`` record (claimed or read most long ago): its token simply
       runs again on its next retry;
    3. a live ``IN_PROGRESS`` claim is never evicted: evicting it would let a retry run the agent, and its tools,
       a second time while the first run is still going. When every record is a live claim, ``claim`` raises
       ``IdempotencyStoreError`` ("store is full of running claims; raise max_entries"): the new invocation does
       not run, and its caller may retry later, exactly as if a shared store were unreachable.

    Cost: O(log n) per write and O(1) per read on the hot path; running claims and completed records are kept apart
    (completed ones in least-recently-used order) and expiry deadlines in a heap, so making room never scans the
    records.

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
        self._claims: dict[str, IdempotencyRecord] = {}
        self._completed: OrderedDict[str, IdempotencyRecord] = OrderedDict()  # least recently used first
        # (when the record stops being live, tie-breaker, key, the record the entry was pushed for)
        self._deadlines: list[tuple[float, int, str, IdempotencyRecord]] = []
        self._sequence = itertools.count()
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        """Number of records held (expired ones included until read or evicted)."""
        return len(self._claims) + len(self._completed)

    supports_blocking_claims = True

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``.

        Raises:
            IdempotencyStoreError: The key is new and every one of the ``max_entries`` records is a live claim.
        """
        return self.claim_blocking(record, now)

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``, which never blocks for long here (one lock)."""
        with self._mutex:
            existing = self._lookup(record.key)
            if existing is not None and existing.is_live(now) and not _own_claim(existing, record.owner):
                if existing.state is RecordState.COMPLETED:
                    self._completed.move_to_end(record.key)
                return existing
            if existing is None and len(self) >= self.max_entries:
                self._make_room(now)
            self._put(record)
            return None

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``; an expired record is dropped on read."""
        with self._mutex:
            record = self._lookup(key)
            if record is None:
                return None
            if record.expires_at <= time.time():
                self._remove(key)
                return None
            if record.state is RecordState.COMPLETED:
                self._completed.move_to_end(key)
            return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``."""
        with self._mutex:
            if not self._owned_in_progress(record.key, record.owner):
                return False
            self._put(record)
            return True

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``."""
        with self._mutex:
            if not self._owned_in_progress(key, owner):
                return False
            self._remove(key)
            return True

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        """See ``IdempotencyStore.renew``."""
        with self._mutex:
            if not self._owned_in_progress(key, owner):
                return False
            self._put(_renewed(self._claims[key], lease_expires_at, checkpoint))
            return True

    # The helpers below run with ``_mutex`` held.

    def _lookup(self, key: str) -> IdempotencyRecord | None:
        record = self._claims.get(key)
        return record if record is not None else self._completed.get(key)

    def _owned_in_progress(self, key: str, owner: str) -> bool:
        """The fence of complete, release and renew."""
        existing = self._claims.get(key)
        return existing is not None and existing.owner == owner

    def _put(self, record: IdempotencyRecord) -> None:
        """Store ``record`` under its key (replacing any), most recently used, with its deadline in the heap."""
        self._remove(record.key)
        if record.state is RecordState.IN_PROGRESS:
            self._claims[record.key] = record
            deadline = min(record.lease_expires_at, record.expires_at)
        else:
            self._completed[record.key] = record
            deadline = record.expires_at
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), record.key, record))
        if len(self._deadlines) > 2 * len(self) + _HEAP_SLACK:
            self._deadlines = [
                (min(r.lease_expires_at, r.expires_at), next(self._sequence), k, r) for k, r in self._claims.items()
            ] + [(r.expires_at, next(self._sequence), k, r) for k, r in self._completed.items()]
            heapq.heapify(self._deadlines)

    def _remove(self, key: str) -> None:
        """Forget ``key``; its heap entries go stale and are skipped when they surface."""
        if self._claims.pop(key, None) is None:
            self._completed.pop(key, None)

    def _make_room(self, now: float) -> None:
        """Free at least one entry for a new key, or raise: see the eviction order in the class docstring."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key, record = heapq.heappop(deadlines)
            # An entry whose record was replaced since (renewed, completed, re-claimed) is stale: skip it.
            if self._lookup(key) is record:
                self._remove(key)
        if len(self) < self.max_entries:
            return
        if self._completed:
            self._completed.popitem(last=False)
            return
        raise IdempotencyStoreError(
            f"in-memory idempotency store is full of running claims ({len(self._claims)} live IN_PROGRESS records, "
            f"max_entries={self.max_entries}); raise max_entries"
        )


def _own_claim(existing: IdempotencyRecord, owner: str) -> bool:
    return existing.state is RecordState.IN_PROGRESS and existing.owner == owner


def _renewed(existing: IdempotencyRecord, lease_expires_at: float, checkpoint: str | None) -> IdempotencyRecord:
    return dataclasses.replace(
        existing,
        lease_expires_at=lease_expires_at,
        expires_at=max(existing.expires_at, lease_expires_at),
        checkpoint=existing.checkpoint if checkpoint is None else checkpoint,
    )
