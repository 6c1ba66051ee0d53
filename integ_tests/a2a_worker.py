"""One A2A server process for the A2A tests: ``python integ_tests/a2a_worker.py <config.json>``.

An ``A2AApp`` under uvicorn on 127.0.0.1: its store a real redis-server shared with the other server process, its
contexts ``FileSessionManager`` directories shared too, its agent the demo's (one tool call, then an answer streamed
word by word). A message whose text starts with ``hold:<name> `` stops its answer before word ``hold_at_word``: the
process appends ``held <name>`` to the ledger and waits until its agent is cancelled or the file ``<go>/<name>``
exists (polled, bounded). Every model call is appended to the ledger as ``model <name>`` (with the pid), so the test
counts what each server paid, and in which order.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from _held import LatchedAgent, hold
from strands.session.file_session_manager import FileSessionManager

from strands_py.a2a import A2AApp
from strands_py.http import run
from strands_py.http._demo import DEMO_ANSWER, StreamingScript
from strands_py.idempotency import IdempotencyConfig
from strands_py.idempotency.redis import RedisIdempotencyStore


class Ledger:
    """Lines ``<pid> <what> <name>`` appended to one file shared by every process (O_APPEND: whole lines)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def write(self, what: str, name: str) -> None:
        with self.lock:
            os.write(self.fd, f"{os.getpid()} {what} {name}\n".encode())


class CountedScript(StreamingScript):
    """The demo's streaming script, each model call written to the ledger under the message's name."""

    def __init__(self, ledger: Ledger, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = ledger
        self.name = name

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        self.ledger.write("model", self.name)
        return super().converse_stream(**request)


def name_of(request: Any) -> tuple[str, bool]:
    """The message's name (``hold:<name>`` or its messageId) and whether its answer is held."""
    message = request.state.a2a_message
    text = message.parts[0].root.text if message.parts else ""
    if text.startswith("hold:"):
        return text[5:].split(" ", 1)[0], True
    return message.message_id, False


def main(path: str) -> None:
    with open(path) as f:
        config = json.load(f)
    ledger = Ledger(config["ledger"])
    hold_at = config["hold_at_word"]

    def make_agent(request: Any, session_manager: Any = None) -> LatchedAgent:
        name, held = name_of(request)
        holder: list[LatchedAgent] = []
        go = os.path.join(config["go"], name)

        def pace(index: int) -> None:
            if not held or index != hold_at:
                return
            ledger.write("held", name)
            hold(holder[0], go)  # until its agent was cancelled (strands stops at the next chunk) or released
            ledger.write("released", name)

        script = CountedScript(ledger, name, answer=DEMO_ANSWER, pace=pace)
        agent = LatchedAgent(
            model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager
        )
        holder.append(agent)
        return agent

    def session_manager(session_id: str, request: Any) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=config["sessions"])

    idempotency = IdempotencyConfig(
        store=RedisIdempotencyStore.from_url(config["redis"]),
        scope="a2a",
        lease_seconds=config["lease_seconds"],
        session_invocation_mode="enqueue",
    )
    app = A2AApp(make_agent, idempotency, single_tenant=True, session_manager=session_manager, name="weather")
    run(app, host="127.0.0.1", port=config["port"], log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1])
