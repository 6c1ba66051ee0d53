from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from strands_py import Agent
from strands_py.http import AgentApp, _server
from strands_py.http._demo import DEMO_ANSWER, demo_agent_factory
from strands_py.http._runs import Run
from strands_py.http.agentcore import AgentCoreEntrypoint


def test_run_drains_the_app_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    servers: list[Any] = []
    monkeypatch.setattr(_server.Server, "run", lambda self: servers.append(self))
    app = AgentApp(lambda request: Agent())
    _server.run(app, port=0, log_level="warning")
    _server.run(lambda scope, receive, send: None, port=0)
    assert servers[0]._drain == [app] and servers[0].config.port == 0
    assert servers[1]._drain == []


def test_the_demo_agent_answers_from_its_script_without_aws() -> None:
    agent = demo_agent_factory(0.0)(None)  # type: ignore[arg-type]
    assert str(agent("Weather in Paris?")) == DEMO_ANSWER + "\n"


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/invocations", "headers": [], "query_string": b""})


async def test_agentcore_entrypoint_without_a_request_or_with_a_refusing_scope() -> None:
    def refuse(request: Request) -> str:
        raise HTTPException(401, "sign in")

    entrypoint = AgentCoreEntrypoint(lambda request: Agent(), scope=refuse)
    missing = await entrypoint({"prompt": "hi", "idempotency_key": "k"}, SimpleNamespace())
    refused = await entrypoint({"prompt": "hi", "idempotency_key": "k"}, SimpleNamespace(request=_request()))
    assert missing.status_code == 500
    assert refused.status_code == 401 and json.loads(bytes(refused.body))["detail"] == "sign in"
    entrypoint._track(Run("k", None, 1), True)  # not installed: nothing to report to
    app = SimpleNamespace(entrypoint=lambda f: None, complete_async_task=lambda task: pytest.fail("not started"))
    entrypoint.install(app)
    entrypoint._track(Run("k", None, 1), False)
