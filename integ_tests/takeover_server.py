"""One server process for test_http_takeover.py: ``python integ_tests/takeover_server.py <config.json>``.

An ``AgentApp`` (with its page) under uvicorn on 127.0.0.1, its store a real redis-server, its agent the demo's
(one tool call, then an answer streamed word by word). With ``stop_at_word`` the process stops for good in the middle
of the answer: before streaming that word it appends ``stopped`` to its ledger and waits there until the test kills
it. Every model call and tool run is appended to the ledger (with the pid), so the test counts what each server paid.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from strands import tool

from strands_py import Agent
from strands_py.http import AgentApp, run
from strands_py.http._demo import DEMO_ANSWER, StreamingScript
from strands_py.idempotency import IdempotencyConfig
from strands_py.idempotency.redis import RedisIdempotencyStore


class _Ledger:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
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
    stop_at = config.get("stop_at_word")

    def pace(index: int) -> None:
        if stop_at is not None and index == stop_at:
            ledger.write("stopped")
            threading.Event().wait(600)

    def make_agent(request: Any) -> Agent:
        script = _Counted(ledger, answer=DEMO_ANSWER, pace=pace)
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    store = RedisIdempotencyStore.from_url(config["redis"])
    app = AgentApp(
        make_agent,
        IdempotencyConfig(store=store, scope="takeover", lease_seconds=config["lease_seconds"]),
        single_tenant=True,
        page=True,
        reconnect_millis=200,
    )
    run(app, host="127.0.0.1", port=config["port"], log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1])
