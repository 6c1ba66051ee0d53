"""``CountingStore``: wraps any idempotency store and counts its primitives (for tests and benchmarks)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord


class CountingStore(IdempotencyStore):
    """Forwards to ``inner`` and counts each call in ``calls`` by primitive name (``claim``, ``renew``, ...).

    A blocking claim counts as a ``claim``. ``on_claim`` runs after every claim (a multiprocessing counter, say).
    ``complete_result`` forces what ``complete`` reports (False simulates a fenced-off primary) while still
    forwarding the write.
    """

    def __init__(
        self,
        inner: IdempotencyStore,
        *,
        on_claim: Callable[[], None] | None = None,
        complete_result: bool | None = None,
    ) -> None:
        """Wrap ``inner``."""
        self.inner = inner
        self.max_result_bytes = inner.max_result_bytes
        self.supports_blocking_claims = inner.supports_blocking_claims
        self.supports_journal = inner.supports_journal
        self.supports_cancel = inner.supports_cancel
        self.max_journal_entry_bytes = inner.max_journal_entry_bytes
        self.calls: Counter[str] = Counter()
        self._on_claim = on_claim
        self._complete_result = complete_result

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Count and forward."""
        existing = await self.inner.claim(record, now)
        self.calls["claim"] += 1
        if self._on_claim is not None:
            self._on_claim()
        return existing

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Count (as a ``claim``) and forward."""
        existing = self.inner.claim_blocking(record, now)
        self.calls["claim"] += 1
        if self._on_claim is not None:
            self._on_claim()
        return existing

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """Count and forward."""
        self.calls["take_over"] += 1
        return await self.inner.take_over(record, version)

    async def get(self, key: str) -> IdempotencyRecord | None:
        """Count and forward."""
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def complete(self, record: IdempotencyRecord) -> bool:
        """Count and forward."""
        self.calls["complete"] += 1
        done = await self.inner.complete(record)
        return done if self._complete_result is None else self._complete_result

    async def release(self, key: str, owner: str) -> bool:
        """Count and forward."""
        self.calls["release"] += 1
        return await self.inner.release(key, owner)

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
        """Count and forward."""
        self.calls["renew"] += 1
        return await self.inner.renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """Count and forward."""
        self.calls["append"] += 1
        return await self.inner.append(key, owner, entry)

    async def journal(self, key: str) -> list[bytes]:
        """Count and forward."""
        self.calls["journal"] += 1
        return await self.inner.journal(key)

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """Count and forward."""
        self.calls["truncate"] += 1
        return await self.inner.truncate(key, owner, length)

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        """Count and forward."""
        self.calls["cancel"] += 1
        return await self.inner.cancel(key)

    def use_event_loop(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Forward (not counted: no call reaches the store)."""
        return self.inner.use_event_loop()
