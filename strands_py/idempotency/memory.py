"""``InMemoryIdempotencyStore``: the embedded default, for one process."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict

from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState


class InMemoryIdempotencyStore(IdempotencyStore):
    """Records in a dict in this process, with expiry and a bound on entries (least recently used evicted).

    Shared by every agent given the same instance (records are namespaced by scope). It deduplicates retries
    that reach this process only; use ``DynamoDBIdempotencyStore`` behind a load balancer. No I/O, so its
    primitives run inline without an executor.

    Thread-safety: one lock guards the dict; safe from any thread and event loop.
    """

    def __init__(self, *, max_entries: int = 10_000, max_result_bytes: int | None = None) -> None:
        """Create a store.

        Args:
            max_entries: Most records kept; beyond it the least recently used one is evicted (an evicted
                completed record simply runs again on its next retry).
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
        self._records: OrderedDict[str, IdempotencyRecord] = OrderedDict()
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        """Number of records held (expired ones included until touched or evicted)."""
        return len(self._records)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``."""
        with self._mutex:
            existing = self._records.get(record.key)
            if existing is not None and existing.is_live(now) and not _own_claim(existing, record.owner):
                self._records.move_to_end(record.key)
                return existing
            self._records[record.key] = record
            self._records.move_to_end(record.key)
            while len(self._records) > self.max_entries:
                self._records.popitem(last=False)
            return None

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``; an expired record is dropped on read."""
        with self._mutex:
            record = self._records.get(key)
            if record is not None and record.expires_at <= time.time():
                del self._records[key]
                return None
            return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``."""
        with self._mutex:
            if not self._owned_in_progress(record.key, record.owner):
                return False
            self._records[record.key] = record
            return True

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``."""
        with self._mutex:
            if not self._owned_in_progress(key, owner):
                return False
            del self._records[key]
            return True

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        """See ``IdempotencyStore.renew``."""
        with self._mutex:
            if not self._owned_in_progress(key, owner):
                return False
            self._records[key] = _renewed(self._records[key], lease_expires_at, checkpoint)
            return True

    def _owned_in_progress(self, key: str, owner: str) -> bool:
        """The fence of complete and release; the caller holds ``_mutex``."""
        existing = self._records.get(key)
        return existing is not None and existing.owner == owner and existing.state is RecordState.IN_PROGRESS


def _own_claim(existing: IdempotencyRecord, owner: str) -> bool:
    return existing.state is RecordState.IN_PROGRESS and existing.owner == owner


def _renewed(existing: IdempotencyRecord, lease_expires_at: float, checkpoint: str | None) -> IdempotencyRecord:
    return dataclasses.replace(
        existing,
        lease_expires_at=lease_expires_at,
        expires_at=max(existing.expires_at, lease_expires_at),
        checkpoint=existing.checkpoint if checkpoint is None else checkpoint,
    )
