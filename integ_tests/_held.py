"""Answers held mid-stream by the test servers until their agent is cancelled or the test releases them.

A held model waits on its worker thread. It must not poll the agent's ``cancel_signal``: strands clears that signal
when the invocation ends (so the agent can be reused), and newer strands (``BedrockModel`` polling the signal) ends a
cancelled stream without waiting for the model's thread. A cancel can then be set and cleared between two polls of the
held thread, which never sees it and holds until its deadline. ``LatchedAgent`` latches every ``cancel()`` in an event
that is never cleared, and ``hold`` waits on it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from strands_py import Agent

HOLD_SECONDS = 60.0
POLL_SECONDS = 0.01


class LatchedAgent(Agent):
    """``strands_py.Agent`` whose ``cancel()`` also sets ``cancelled``, an event that stays set for good."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cancelled = threading.Event()

    def cancel(self, *args: Any, **kwargs: Any) -> None:
        self.cancelled.set()
        super().cancel(*args, **kwargs)


def hold(agent: LatchedAgent, go: str, seconds: float = HOLD_SECONDS) -> None:
    """Wait (on the model's thread) until ``agent`` was cancelled or the file ``go`` exists; bounded.

    Raises:
        TimeoutError: Neither happened within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    # The event wakes the wait at once; the file is polled between waits, all bounded by the deadline.
    while not agent.cancelled.wait(POLL_SECONDS) and not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError("held too long: neither cancelled nor released")
