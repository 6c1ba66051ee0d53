"""Public session types (kept apart from ``strands_py.session`` so configuration can import them)."""

from __future__ import annotations

from enum import Enum


class SessionInvocationMode(str, Enum):
    """What a turn does when another request holds its session.

    The values are those of strands' ``concurrent_invocation_mode`` (``"throw"``, and ``"enqueue"`` as upstream is
    designing it), so the string of either is accepted.

    Values:
        THROW: Raise ``SessionBusyError`` (a ``ConcurrencyException``; HTTP 409) at once.
        ENQUEUE: Wait, holding no thread, in arrival order within a process and by polling across processes, at most
            ``wait_timeout_seconds``; then ``SessionBusyError``.
    """

    THROW = "throw"
    ENQUEUE = "enqueue"
