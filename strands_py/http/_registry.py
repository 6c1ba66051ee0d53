"""``RunRegistry``: the runs of one app by durable key, live ones and, for a short while, finished ones."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ._runs import Run


class RunRegistry:
    """The runs of one app by durable key: live ones, and finished ones for a short, bounded time.

    Memory: at most ``retain_runs`` finished runs, each at most ``max_buffered_events`` events, kept at most
    ``retain_seconds``; live runs are bounded by the app's ``max_concurrent_runs``. Thread-safe.
    """

    def __init__(self, retain_runs: int, retain_seconds: float) -> None:
        """An empty registry."""
        self._retain_runs = retain_runs
        self._retain_seconds = retain_seconds
        self._lock = threading.Lock()
        self._live: dict[str, Run] = {}
        self._finished: OrderedDict[str, Run] = OrderedDict()
        self._active: set[Run] = set()

    def find(self, key: str) -> Run | None:
        """The live run of ``key``, else its retained finished run, else None."""
        with self._lock:
            self._evict()
            return self._live.get(key) or self._finished.get(key)

    def add(self, run: Run) -> None:
        """Register a run that is about to start (a keyed run becomes the key's live run)."""
        with self._lock:
            self._active.add(run)
            if run.key is not None:
                self._live[run.key] = run
                self._finished.pop(run.key, None)

    @property
    def active(self) -> int:
        """Runs whose task has not ended."""
        with self._lock:
            return len(self._active)

    def active_runs(self) -> list[Run]:
        """A snapshot of the runs whose task has not ended."""
        with self._lock:
            return list(self._active)

    def settled(self, run: Run) -> None:
        """A run's task ended: it stops being live and is retained (its events) for reconnects."""
        with self._lock:
            self._active.discard(run)
            if run.key is None or self._live.get(run.key) is not run:
                return
            del self._live[run.key]
            self._finished[run.key] = run
            self._evict()

    def clear(self) -> None:
        """Forget every finished run (the app closed)."""
        with self._lock:
            self._finished.clear()

    def _evict(self) -> None:
        """Drop finished runs beyond the count or past their time; the caller holds the lock."""
        deadline = time.monotonic() - self._retain_seconds
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if len(self._finished) <= self._retain_runs and oldest.finished_at > deadline:
                break
            self._finished.popitem(last=False)
