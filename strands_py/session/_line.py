"""Callers of one process waiting for one session, in arrival order, holding no thread.

Only the head of a line polls the store; the others wait on a future of their own event loop until the caller ahead
of them leaves. Lines are kept per store object (by identity) and per session key.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from ..idempotency._identity import _PerObject
from ..idempotency.base import IdempotencyStore


class Ticket:
    __slots__ = ("loop", "turn")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.turn: asyncio.Future[None] = self.loop.create_future()


def _serve(ticket: Ticket) -> None:
    """Tell ``ticket`` it is at the head of the line; runs on the ticket's loop."""
    if not ticket.turn.done():
        ticket.turn.set_result(None)


class _Line:
    """Callers of one process waiting for one session, in arrival order.

    Thread-safety: every method runs under the module's ``_lines_mutex``, which also guards the map of lines, so a
    line is dropped from the map exactly when it empties and a caller never joins a line that was dropped.
    """

    __slots__ = ("tickets",)

    def __init__(self) -> None:
        self.tickets: deque[Ticket] = deque()


# Per store object, by identity (a user's store may be unhashable).
_lines: _PerObject[dict[str, _Line]] = _PerObject()
_lines_mutex = threading.Lock()


def join(store: IdempotencyStore, key: str) -> Ticket:
    ticket = Ticket()
    with _lines_mutex:
        line = _lines.setdefault(store, dict).setdefault(key, _Line())
        line.tickets.append(ticket)
        first = line.tickets[0] is ticket
    if first:
        ticket.turn.set_result(None)
    return ticket


def leave(store: IdempotencyStore, key: str, ticket: Ticket) -> None:
    while True:
        with _lines_mutex:
            lines = _lines.get(store)
            line = lines.get(key) if lines is not None else None
            if lines is None or line is None or ticket not in line.tickets:
                return
            was_head = line.tickets[0] is ticket
            line.tickets.remove(ticket)
            head = line.tickets[0] if was_head and line.tickets else None
            if not line.tickets:
                del lines[key]
        if head is None:
            return
        try:
            head.loop.call_soon_threadsafe(_serve, head)
            return
        except RuntimeError:
            # That caller's loop is gone, and the caller with it: serve the one after it.
            ticket = head


def busy(store: IdempotencyStore, key: str) -> bool:
    with _lines_mutex:
        lines = _lines.get(store)
        return lines is not None and key in lines
