"""This server's turns of each conversation, in arrival order: who runs, who waits, and each one's position.

A turn of a conversation starts its agent only once the turns that arrived before it on this server have ended,
so the positions this server reports are exact for this server. Across servers the session lock decides (a turn at
the head of its line here may still wait for another server's turn: the line then counts that turn as one ahead
until its own head has started). Positions are this server's knowledge only: a turn queued on another server is
not counted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

# Conversations whose last completed turn is remembered (for GET /sessions/{id}); the oldest are forgotten first.
_MAX_REMEMBERED = 1024


class _Line:
    __slots__ = ("elsewhere", "places")

    def __init__(self) -> None:
        self.places: list[SessionPlace] = []
        self.elsewhere = False  # the head waits for another server's turn (seen when the line began)


class SessionPlace:
    """One turn's place in its conversation's line (``Place`` of ``_runs.py``).

    Attributes:
        session_id: The conversation's id, as the caller named it.
        run: The turn's run, once registered.
    """

    def __init__(self, lines: SessionLines, key: str, line: _Line, session_id: str) -> None:
        """A place at the end of ``line``; ``turn()`` returns once it heads the line."""
        self._lines = lines
        self._key = key
        self._line = line
        self.session_id = session_id
        self.run: Any = None
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def position(self) -> int:
        """Turns ahead of this one (0: its turn has come, or it left the line)."""
        line = self._line
        try:
            index = line.places.index(self)
        except ValueError:
            return 0
        head = line.places[0].run
        if line.elsewhere and head is not None and head.decided:
            line.elsewhere = False  # the head got the session: no other server's turn is ahead any more
        return index + (1 if line.elsewhere else 0)

    async def turn(self) -> None:
        """Wait until this turn heads the line (the turns before it here have ended).

        Cancellation: ends the wait; the place stays in the line until ``leave()``.
        """
        await self._turn

    def leave(self) -> None:
        """Leave the line (the turn's run ended), letting the next turn start. Idempotent."""
        self._lines._leave(self)

    def _serve(self) -> None:
        if not self._turn.done():
            self._turn.set_result(None)


class SessionLines:
    """The lines of every conversation with a turn on this server, by session lock key.

    Thread-safety: the app's event loop only (joined by requests, left by runs' done callbacks, both on it).
    """

    def __init__(self) -> None:
        """No lines."""
        self._lines: dict[str, _Line] = {}
        self._last: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    def places(self, key: str) -> list[SessionPlace]:
        """The places in the line of ``key``, head first (a snapshot)."""
        line = self._lines.get(key)
        return [] if line is None else list(line.places)

    def busy(self, key: str) -> bool:
        """Whether a turn of ``key`` runs or waits on this server."""
        return key in self._lines

    def join(self, key: str, session_id: str, *, elsewhere: bool = False) -> SessionPlace:
        """A place at the end of the line of ``key``; ``elsewhere``: a new line's head waits for another server."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
            line.elsewhere = elsewhere
        place = SessionPlace(self, key, line, session_id)
        line.places.append(place)
        if line.places[0] is place:
            place._serve()
        return place

    def last_completed(self, key: str) -> tuple[str | None, float] | None:
        """The durable key and end (``time.time()``) of the last turn of ``key`` that completed here, if remembered."""
        return self._last.get(key)

    def _leave(self, place: SessionPlace) -> None:
        line = self._lines.get(place._key)
        if line is None or place not in line.places:
            return
        was_head = line.places[0] is place
        line.places.remove(place)
        run = place.run
        if run is not None and run.succeeded:
            self._last[place._key] = (run.key, run.finished_wall)
            self._last.move_to_end(place._key)
            while len(self._last) > _MAX_REMEMBERED:
                self._last.popitem(last=False)
        if not line.places:
            del self._lines[place._key]
        elif was_head:
            line.places[0]._serve()
