"""Values kept beside objects compared by identity: per-store state that any store object can have.

A store is the user's own object: a dataclass store (``eq=True`` sets ``__hash__`` to None) is unhashable, and a
class with ``__slots__`` may not be weakly referenceable. Keying by ``id()`` with a weak reference beside it works
for all of them: the entry goes away with the object, and an object that cannot be weakly referenced keeps its
entry (and so stays alive) for the life of the process.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class _Strong:
    """Stands in for a weak reference to an object that cannot have one."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __call__(self) -> object:
        return self.obj


class _PerObject(Generic[V]):
    """Object (by identity) → value.

    Thread-safety: every method is safe from any thread. The reentrant mutex matters: a weak reference's callback
    runs inside whatever code triggered the garbage collection, which may be this very map holding its mutex.
    """

    __slots__ = ("_entries", "_mutex")

    def __init__(self) -> None:
        """Create an empty map."""
        self._entries: dict[int, tuple[Callable[[], object], V]] = {}
        self._mutex = threading.RLock()

    def get(self, obj: object) -> V | None:
        """The value kept for ``obj``, or None."""
        with self._mutex:
            entry = self._entries.get(id(obj))
            # The identity check guards against an id reused by a newer object (an entry is dropped on collection,
            # so this only matters for a stale read; it costs nothing).
            return entry[1] if entry is not None and entry[0]() is obj else None

    def setdefault(self, obj: object, factory: Callable[[], V]) -> V:
        """The value kept for ``obj``, made by ``factory`` (under the mutex, so exactly once) if there is none."""
        with self._mutex:
            value = self.get(obj)
            if value is not None:
                return value
            value = factory()
            key = id(obj)
            ref: Callable[[], object]
            try:
                ref = weakref.ref(obj, lambda dead, key=key: self._drop(key, dead))  # type: ignore[misc]
            except TypeError:
                ref = _Strong(obj)
            self._entries[key] = (ref, value)
            return value

    def _drop(self, key: int, ref: Any) -> None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def __len__(self) -> int:
        """Number of live entries."""
        return len(self._entries)
