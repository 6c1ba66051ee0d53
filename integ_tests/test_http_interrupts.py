"""Humans in the loop over HTTP, on a real uvicorn: a tool that asks for approval, answered by httpx clients.

A turn stops for the tool's approval (``tool_context.interrupt("approval", reason={...})``, answered with
``{"approved": bool}`` as the demo's tool is); the answer is a new turn with ``interrupt_responses`` and a new key.
A double click (the same key, while the answer runs and after) resumes the tool once; an answer to an interrupt
answered already is 409 ``interrupt-stale`` with what is pending; a new prompt while an interrupt is pending is 409
``interrupts-pending`` with it; a second tab's answer queued behind the first (``enqueue``) is refused when its turn
comes, never a second resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_support import status_becomes
from http_support import WAIT, Observer, client, headers, new_key, serve
from starlette.requests import Request
from strands import ToolContext, tool
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py.http import AgentApp
from strands_py.http._problems import INTERRUPT_STALE, INTERRUPTS_PENDING
from strands_py.idempotency import IdempotencyConfig
from strands_py.session import _turn
from strands_py.testing import ScriptedBedrock


class _Approvals(ScriptedBedrock):
    """The script's tool acts (``acted``) only once a human approved it."""

    def __init__(self) -> None:
        super().__init__(gate_timeout=WAIT)
        self.acted = 0
        self._count = threading.Lock()

    def hold(self) -> None:
        """From now on, model calls wait at a gate (``release`` opens it)."""
        self.gate = threading.Event()
        self.entered.clear()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    def tools(self) -> list[Any]:
        script = self

        @tool(context=True)
        def lookup_weather(city: str, tool_context: ToolContext) -> str:
            """Look up the weather, once a human approved it.

            Args:
                city: The city.
            """
            answer = tool_context.interrupt("approval", reason={"city": city})
            if not (isinstance(answer, dict) and answer.get("approved") is True):
                return "not approved"
            with script._count:
                script.acted += 1
            return f"{city}: sunny"

        return [lookup_weather]


@contextlib.asynccontextmanager
async def _served(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, _Approvals, Observer]]:
    script = _Approvals()
    model = script.model()

    def agent(request: Request, session_manager: Any = None) -> Agent:
        return Agent(model=model, tools=script.tools(), callback_handler=None, session_manager=session_manager)

    def manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    app = AgentApp(agent, IdempotencyConfig(**config), single_tenant=True, session_manager=manager)
    observed = Observer(app, expected=1 << 30)
    try:
        with serve(observed, drain=[app]) as server:
            async with client(server.url) as http:
                yield http, script, observed
    finally:
        script.release()


def _answer(interrupt: dict[str, Any], approved: bool = True) -> dict[str, Any]:
    return {"interrupt_responses": [{"interrupt_id": interrupt["id"], "response": {"approved": approved}}]}


async def _ask(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    asked = await http.post("/sessions/trip/invocations", json={"prompt": "Weather in Paris?"}, headers=headers(key))
    assert asked.status_code == 200 and asked.json()["stop_reason"] == "interrupt", asked.text
    interrupt: dict[str, Any] = asked.json()["interrupts"][0]
    return interrupt


async def _arrived(observed: Observer, send: Any) -> Any:
    """Start ``send`` (a request) and return its task once the server has received it."""
    observed.all_in.clear()
    observed.expected = observed.count + 1
    task = asyncio.ensure_future(send)
    assert await asyncio.to_thread(observed.all_in.wait, WAIT), "the request never reached the server"
    return task


def _problem(response: httpx.Response, problem_type: str) -> list[dict[str, Any]]:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["type"] == problem_type and "Retry-After" not in response.headers
    pending: list[dict[str, Any]] = body["pending"]
    return pending


async def test_an_approval_answered_by_a_double_click_resumes_once_and_stale_answers_are_409(tmp_path: Path) -> None:
    async with _served(tmp_path) as (http, script, observed):
        interrupt = await _ask(http, new_key())
        assert (await http.get("/sessions/trip")).json()["pending_interrupts"] == [interrupt]

        # The double click: the second arrives while the first holds the conversation (its model call waits).
        script.hold()
        click, sse = new_key(), {"Accept": "text/event-stream"}
        first = await _arrived(
            observed, http.post("/sessions/trip/invocations", json=_answer(interrupt), headers=headers(click))
        )
        assert await asyncio.to_thread(script.entered.wait, WAIT)  # the tool acted; the model call after it waits
        second = await _arrived(
            observed,
            http.post("/sessions/trip/invocations", json=_answer(interrupt), headers={**headers(click), **sse}),
        )
        script.release()
        first_done, second_done = await asyncio.gather(first, second)
        later = await http.post("/sessions/trip/invocations", json=_answer(interrupt), headers=headers(click))

        stale = await http.post(
            "/sessions/trip/invocations", json=_answer(interrupt, False), headers=headers(new_key())
        )
        again = await _ask(http, new_key())  # the next question asks again
        refused_key = new_key()
        pending = await http.post("/sessions/trip/invocations", json={"prompt": "Rome?"}, headers=headers(refused_key))
        denied = await http.post("/sessions/trip/invocations", json=_answer(again, False), headers=headers(refused_key))
        state = (await http.get("/sessions/trip")).json()

    assert first_done.json()["stop_reason"] == "end_turn" and first_done.json()["interrupts"] == []
    assert second_done.status_code == 200 and "event: result" in second_done.text
    assert second_done.headers["idempotent-replayed"] == later.headers["idempotent-replayed"] == "true"
    assert later.json() == first_done.json()
    assert _problem(stale, INTERRUPT_STALE) == []
    assert _problem(pending, INTERRUPTS_PENDING) == [again] and again["id"] != interrupt["id"]
    assert denied.json()["stop_reason"] == "end_turn"  # the refused key was free for the answer
    assert script.acted == 1 and state["pending_interrupts"] == [] and state["status"] == "idle"


async def _two_tabs(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Two tabs answer one approval with keys of their own; the second waits behind the first (``enqueue``)."""
    async with _served(tmp_path, session_invocation_mode="enqueue", wait_timeout_seconds=WAIT) as (http, script, _):
        interrupt = await _ask(http, new_key())
        script.hold()
        one, two = new_key(), new_key()
        first = asyncio.ensure_future(
            http.post("/sessions/trip/invocations", json=_answer(interrupt), headers=headers(one))
        )
        assert await asyncio.to_thread(script.entered.wait, WAIT)
        queued = await http.post("/sessions/trip/invocations", json=_answer(interrupt), headers=headers(two))
        assert queued.status_code == 202, queued.text
        script.release()
        await first
        return (await status_becomes(http, one, "completed")), (await status_becomes(http, two, "failed")), script.acted


async def test_a_second_tab_answering_the_same_approval_is_refused_when_its_turn_comes(tmp_path: Path) -> None:
    first, second, acted = await _two_tabs(tmp_path)
    assert first["result"]["stop_reason"] == "end_turn" and acted == 1
    assert second["problem"]["type"] == INTERRUPT_STALE and second["problem"]["pending"] == []


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: no interrupt check under the lock")
async def test_negative_control_without_the_check_the_second_tab_is_not_refused_as_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn, "check_interrupts", lambda agent, prompt: None)
    await test_a_second_tab_answering_the_same_approval_is_refused_when_its_turn_comes(tmp_path)
