"""One server process for the run-control and conversation tests: ``python integ_tests/control_server.py <config>``.

An ``AgentApp`` under uvicorn on 127.0.0.1, its store a real redis-server shared with the other server process, its
conversations ``FileSessionManager`` directories shared too, its agent the demo's (one tool call, then an answer
streamed word by word). With ``hold_at_word``, the answer of every turn stops before that word: the process appends
``held`` to its ledger, and waits there until the agent is cancelled or the test creates the ``go`` file (polled,
bounded). Every model call and tool run is appended to the ledger (with the pid), so the test counts what each server
paid.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from _held import LatchedAgent, hold
from strands import tool
from strands.session.file_session_manager import FileSessionManager

from strands_py.http import AgentApp, run
from strands_py.http._demo import DEMO_ANSWER, StreamingScript
from strands_py.idempotency import IdempotencyConfig
from strands_py.idempotency.redis import RedisIdempotencyStore


class _Ledger:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            os.write(self.fd, f"{os.getpid()} {line}\n".encode())
            os.fsync(self.fd)


class _Counted(StreamingScript):
    def __init__(self, ledger: _Ledger, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = ledger

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        self.ledger.write("model")
        return super().converse_stream(**request)

    def tools(self) -> list[Any]:
        ledger = self.ledger

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: The city.
            """
            ledger.write("tool")
            return f"{city}: sunny, 21 degrees"

        return [lookup_weather]


def main(path: str) -> None:
    with open(path) as f:
        config = json.load(f)
    ledger = _Ledger(config["ledger"])
    hold_at = config.get("hold_at_word")
    go = config.get("go", "")

    def make_agent(request: Any, session_manager: Any = None) -> LatchedAgent:
        holder: list[LatchedAgent] = []

        def pace(index: int) -> None:
            if hold_at is None or index != hold_at:
                return
            ledger.write("held")
            hold(holder[0], go)  # until its agent was cancelled (strands stops at the next chunk) or released
            ledger.write("released")

        script = _Counted(ledger, answer=DEMO_ANSWER, pace=pace)
        agent = LatchedAgent(
            model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager
        )
        holder.append(agent)
        return agent

    def session_manager(session_id: str, request: Any) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=config["sessions"])

    store = RedisIdempotencyStore.from_url(config["redis"])
    idempotency = IdempotencyConfig(
        store=store,
        scope="control",
        lease_seconds=config["lease_seconds"],
        session_invocation_mode=config.get("mode", "throw"),
    )
    app = AgentApp(make_agent, idempotency, single_tenant=True, session_manager=session_manager)
    run(app, host="127.0.0.1", port=config["port"], log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1])
