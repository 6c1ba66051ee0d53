"""The durable keys in flight in this process, per store: how Agent instances share one running invocation.

Strands' documentation has servers build one Agent per request, so a retry is another Agent instance. Agents
given the same store (and so, with the same scope, the same durable key) share one ``_InflightRegistry``: the
first call of a key in this process registers its per-agent ``_InflightInvocation`` here and goes to the store;
every later call of that key, on any instance, follows that invocation in-process (thread-free, streamed, no
store call) until the primary has stored its outcome.
"""

from __future__ import annotations

import threading

from ..idempotency._identity import _PerObject
from ..idempotency.base import IdempotencyStore
from ._concurrency import _InflightInvocation


class _InflightRegistry:
    """Durable key → the invocation running it in this process, for one store.

    Thread-safety: one mutex; ``begin`` and ``end`` never block and run no user code.
    """

    __slots__ = ("_entries", "_mutex")

    def __init__(self) -> None:
        """Create an empty registry."""
        self._entries: dict[str, _InflightInvocation] = {}
        self._mutex = threading.Lock()

    def begin(self, key: str, inflight: _InflightInvocation) -> _InflightInvocation | None:
        """Register ``inflight`` as the process's primary for ``key``, unless another invocation already is.

        Returns:
            None if ``inflight`` is now registered (the caller goes to the store), else the invocation to follow.
        """
        with self._mutex:
            existing = self._entries.setdefault(key, inflight)
        return None if existing is inflight else existing

    def end(self, key: str, inflight: _InflightInvocation) -> None:
        """Forget ``key`` if ``inflight`` is still the one registered for it (a no-op otherwise)."""
        with self._mutex:
            if self._entries.get(key) is inflight:
                del self._entries[key]

    def __len__(self) -> int:
        """Number of keys in flight."""
        return len(self._entries)


_registries: _PerObject[_InflightRegistry] = _PerObject()


def registry_for(store: IdempotencyStore) -> _InflightRegistry:
    """The registry shared by every agent whose configuration holds this very store object.

    Kept beside the store (weakly where the store allows it), so it goes away with the store. Stores are compared by
    identity, never by ``__eq__``/``__hash__``: an unhashable store (a dataclass) works like any other.
    """
    return _registries.setdefault(store, _InflightRegistry)
