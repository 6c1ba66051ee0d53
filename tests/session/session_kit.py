"""What the session tests share: a conversation's shape, a tool that blocks, heartbeats that never beat."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from strands import tool

from strands_py.idempotency._heartbeat import _Lease
from strands_py.testing import ScriptedBedrock


def shape(messages: list[Any]) -> list[tuple[str, tuple[str, ...]]]:
    """A conversation's shape: each message's role and the kinds of its blocks (ids and timestamps ignored)."""
    return [(m["role"], tuple(sorted(k for block in m["content"] for k in block))) for m in messages]


# One uninterrupted turn with one tool call.
ONE_TURN = [
    ("user", ("text",)),
    ("assistant", ("toolUse",)),
    ("user", ("toolResult",)),
    ("assistant", ("text",)),
]


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """Leases started inside are never renewed: their owner looks dead to everyone else once they lapse."""

    async def silent(self: _Lease) -> None:
        return None

    with mock.patch.object(_Lease, "_renew_forever", silent):
        yield


class BlockingTool(ScriptedBedrock):
    """The tool blocks on ``tool_gate`` (and reports it entered), like a tool that hangs on a slow service.

    Args:
        wait_seconds: How long the tool waits for its gate.
        must_open: Fail the tool if the gate stays shut that long (else it goes on regardless).
    """

    def __init__(self, wait_seconds: float = 8.0, *, must_open: bool = False) -> None:
        super().__init__()
        self.wait_seconds = wait_seconds
        self.must_open = must_open
        self.tool_gate = threading.Event()
        self.tool_entered = threading.Event()

    def tools(self) -> list[Any]:
        script = self

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather.

            Args:
                city: The city.
            """
            script.tool_entered.set()
            opened = script.tool_gate.wait(script.wait_seconds)
            assert opened or not script.must_open
            script.tool_calls += 1
            return f"{city}: sunny"

        return [lookup_weather]
