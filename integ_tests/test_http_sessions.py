"""Conversations as resources over HTTP: ``POST /sessions/{id}/invocations``, ``GET /sessions/{id}``, its messages.

On a real uvicorn with httpx clients, conversations kept by strands' ``FileSessionManager``: turns that build on each
other, paged messages, a busy conversation refused (``throw``: 409 with ``Retry-After`` from the lease) or queued
(``enqueue``: 202, its status ``queued`` with its position until it runs), conversations scoped per caller (two
callers' ``conv-1`` never share storage), and a conversation busy on ANOTHER server process sharing a redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import RedisServer, redis_server_binary
from control_support import PROMPT, Processes, poll, status_becomes, status_of
from http_support import WAIT, Script, client, headers, new_key, parse_sse, scripted, serve
from starlette.requests import Request
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py.http import (
    CANCELLED,
    INVALID_PARAMETER,
    KEY_MISMATCH,
    MESSAGES_UNAVAILABLE,
    SESSION_BUSY,
    AgentApp,
    _sessions,
)
from strands_py.idempotency import IdempotencyConfig


def _problem(response: httpx.Response, status: int, problem_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == problem_type and body["status"] == status and body["title"] and body["detail"]
    return body


class _Conversations:
    """An app's factories: agents of one script, ``FileSessionManager``s in one directory; the ids they got."""

    def __init__(self, script: Script, directory: Path) -> None:
        self.script = script
        self.directory = str(directory)
        self.session_ids: list[str] = []

    def agent(self, request: Request, session_manager: Any = None) -> Agent:
        self.script.agents += 1
        model, tools = self.script.script.model(), self.script.script.tools()
        return Agent(model=model, tools=tools, callback_handler=None, session_manager=session_manager)

    def manager(self, session_id: str, request: Request) -> FileSessionManager:
        self.session_ids.append(session_id)
        return FileSessionManager(session_id=session_id, storage_dir=self.directory)

    def app(self, **options: Any) -> AgentApp:
        idempotency = options.pop("idempotency", IdempotencyConfig())
        options.setdefault("single_tenant", True)
        return AgentApp(self.agent, idempotency, session_manager=self.manager, **options)


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    with serve(app) as server:
        async with client(server.url) as http:
            yield http


async def _messages(http: httpx.AsyncClient, session: str, **request: Any) -> list[dict[str, Any]]:
    """Every message of the conversation, page after page by the ``next`` links."""
    items: list[dict[str, Any]] = []
    url: str | None = f"/sessions/{session}/messages"
    while url is not None:
        response = await http.get(url, **request)
        request.pop("params", None)  # the next link carries the query
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["messages"]
        url = page["next"]
        assert (response.headers.get("link") is not None) == (url is not None)
    return items


def _prompts(messages: list[dict[str, Any]]) -> list[str]:
    """The user's prompts, in order (tool results are user messages without text)."""
    texts = []
    for item in messages:
        message = item["message"]
        if message["role"] == "user" and "text" in message["content"][0]:
            texts.append(message["content"][0]["text"])
    return texts


# -- turns and messages --------------------------------------------------------------------------------------------


async def test_turns_build_a_conversation_and_its_messages_are_paged(tmp_path: Path) -> None:
    with scripted() as script:
        conversations = _Conversations(script, tmp_path)
        async with _served(conversations.app()) as http:
            first, second = new_key(), new_key()
            one = await http.post("/sessions/trip/invocations", json={"prompt": "Paris?"}, headers=headers(first))
            sse = headers(second, sse=True)
            two = await http.post("/sessions/trip/invocations", json={"prompt": "Rome?"}, headers=sse)
            again = await http.post("/sessions/trip/invocations", json={"prompt": "Paris?"}, headers=headers(first))
            paged = await _messages(http, "trip", params={"limit": 3})
            whole = await http.get("/sessions/trip/messages", params={"limit": 500})
            state = (await http.get("/sessions/trip")).json()
            status = await status_of(http, first)
    assert one.status_code == 200 and one.json()["stop_reason"] == "end_turn"
    assert parse_sse(two.text)[-1].event == "result"
    assert again.headers["idempotent-replayed"] == "true" and again.json() == one.json()
    assert _prompts(paged) == ["Paris?", "Rome?"]  # the replay added nothing
    assert len(paged) == 8 and [m["message_id"] for m in paged] == list(range(8))  # each: prompt, tool, result, answer
    assert paged == whole.json()["messages"] and whole.json()["next"] is None
    assert state["status"] == "idle" and state["running"] is None and state["queued"] == []
    assert state["last_turn"]["key_digest"] and state["updated_at"]
    assert status["status"] == "completed" and status["session"] == "trip"
    assert script.model_calls == 4


async def test_a_page_past_the_end_is_empty_and_bad_parameters_are_400(tmp_path: Path) -> None:
    with scripted() as script:
        async with _served(_Conversations(script, tmp_path).app()) as http:
            await http.post("/sessions/trip/invocations", json=PROMPT, headers=headers(new_key()))
            past = await http.get("/sessions/trip/messages", params={"offset": 100})
            unknown = await http.get("/sessions/never/messages")
            idle = await http.get("/sessions/never")
            bad = [
                await http.get("/sessions/trip/messages", params=params)
                for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"offset": "x"}, {"limit": "²"})
            ]
    assert past.json()["messages"] == [] and past.json()["next"] is None
    assert unknown.json()["messages"] == []
    assert idle.json()["status"] == "idle" and idle.json()["last_turn"] is None and idle.json()["updated_at"] is None
    for response in bad:
        _problem(response, 400, INVALID_PARAMETER)


async def test_one_key_names_one_turn_of_one_conversation(tmp_path: Path) -> None:
    with scripted() as script:
        async with _served(_Conversations(script, tmp_path).app()) as http:
            key = new_key()
            assert (await http.post("/sessions/a/invocations", json=PROMPT, headers=headers(key))).status_code == 200
            other = await http.post("/sessions/b/invocations", json=PROMPT, headers=headers(key))
            plain = await http.post("/invocations", json=PROMPT, headers=headers(key))
    _problem(other, 422, KEY_MISMATCH)
    _problem(plain, 422, KEY_MISMATCH)
    assert script.model_calls == 2


def test_the_agent_factory_must_take_a_session_manager(tmp_path: Path) -> None:
    def manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    with pytest.raises(TypeError, match="session_manager"):
        AgentApp(lambda request: Agent(), single_tenant=True, session_manager=manager)
    with pytest.raises(TypeError, match="factory"):
        AgentApp(lambda request, **options: Agent(), single_tenant=True, session_manager="files")  # type: ignore[arg-type]
    AgentApp(lambda request, **options: Agent(), single_tenant=True, session_manager=manager)


async def test_plain_invocations_get_no_session_manager_and_the_routes_need_the_option(tmp_path: Path) -> None:
    with scripted() as script:
        conversations = _Conversations(script, tmp_path)
        given: list[Any] = []

        def agent(request: Request, session_manager: Any = "missing") -> Agent:
            given.append(session_manager)
            return conversations.agent(request, session_manager)

        app = AgentApp(agent, single_tenant=True, session_manager=conversations.manager)
        async with _served(app) as http:
            plain = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
        async with _served(AgentApp(script.factory(), single_tenant=True)) as http:
            without = await http.post("/sessions/trip/invocations", json=PROMPT, headers=headers(new_key()))
            state = await http.get("/sessions/trip")
    assert plain.status_code == 200 and given == [None]
    assert without.status_code == state.status_code == 404


async def test_a_session_manager_without_a_repository_cannot_list_messages(tmp_path: Path) -> None:
    class Opaque:  # a session manager of another kind: the turn is locked, its messages are not readable here
        session_id = "opaque"

    with scripted() as script:
        conversations = _Conversations(script, tmp_path)
        app = AgentApp(conversations.agent, single_tenant=True, session_manager=lambda sid, request: Opaque())
        async with _served(app) as http:
            response = await http.get("/sessions/trip/messages")
    _problem(response, 501, MESSAGES_UNAVAILABLE)


# -- busy conversations --------------------------------------------------------------------------------------------


async def test_a_busy_conversation_refuses_a_turn_in_throw_mode(tmp_path: Path) -> None:
    with scripted(paced=True) as script:
        idempotency = IdempotencyConfig(lease_seconds=7, session_invocation_mode="throw")
        async with _served(_Conversations(script, tmp_path).app(idempotency=idempotency)) as http:
            running, refused = new_key(), new_key()
            first = asyncio.ensure_future(http.post("/sessions/c/invocations", json=PROMPT, headers=headers(running)))
            await status_becomes(http, running, "running")
            busy = await http.post("/sessions/c/invocations", json={"prompt": "And Rome?"}, headers=headers(refused))
            unknown = await status_of(http, refused)
            script.release(10_000)  # every answer from here on
            assert (await asyncio.wait_for(first, WAIT)).status_code == 200
            later = await http.post("/sessions/c/invocations", json={"prompt": "And Rome?"}, headers=headers(refused))
            messages = await _messages(http, "c")
    body = _problem(busy, 409, SESSION_BUSY)
    assert busy.headers["retry-after"] == "7" and body["retry_after"] == 7  # one lease
    assert unknown["status"] == 404, "a refused turn claimed its key"
    assert later.status_code == 200
    assert _prompts(messages) == [PROMPT["prompt"], "And Rome?"]


async def test_a_busy_conversation_queues_turns_in_enqueue_mode(tmp_path: Path) -> None:
    with scripted(paced=True) as script:
        words = len(script.script.chunks)
        idempotency = IdempotencyConfig(session_invocation_mode="enqueue")
        async with _served(_Conversations(script, tmp_path).app(idempotency=idempotency)) as http:
            k1, k2, k3 = new_key(), new_key(), new_key()
            post = http.post
            first = asyncio.ensure_future(post("/sessions/c/invocations", json={"prompt": "one"}, headers=headers(k1)))
            await status_becomes(http, k1, "running")
            second = await post("/sessions/c/invocations", json={"prompt": "two"}, headers=headers(k2, sse=True))
            third = await post("/sessions/c/invocations", json={"prompt": "three"}, headers=headers(k3))
            again = await post("/sessions/c/invocations", json={"prompt": "two"}, headers=headers(k2))
            busy = (await http.get("/sessions/c", headers=headers(k3))).json()
            queued = await status_of(http, k2)
            cancelled = await http.delete(f"/invocations/{k3}")
            busy_after = (await http.get("/sessions/c", headers=headers(k2))).json()
            script.release(words)  # the first turn's answer
            assert (await asyncio.wait_for(first, WAIT)).status_code == 200
            running = await status_becomes(http, k2, "running")  # its answer waits for the next words
            script.release(10_000)
            completed = await status_becomes(http, k2, "completed")
            idle = (await http.get("/sessions/c")).json()
            messages = await _messages(http, "c")
    assert second.status_code == 202 and second.headers["location"] == f"/invocations/{k2}", second.text
    assert second.json()["status"] == "queued" and second.json()["position"] == 1
    assert third.status_code == 202 and third.json()["position"] == 2
    assert again.status_code == 202 and again.json()["position"] == 1  # the same turn, not a second one
    assert busy["status"] == "busy" and busy["running"]["where"] == "here" and busy["position"] == 2
    assert [q["position"] for q in busy["queued"]] == [1, 2]
    assert queued["status"] == "queued" and queued["position"] == 1 and queued["session"] == "c"
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["problem"]["type"] == CANCELLED
    assert [q["position"] for q in busy_after["queued"]] == [1] and busy_after["position"] == 1
    assert running["where"] == "here" and "position" not in running
    assert completed["result"]["stop_reason"] == "end_turn"
    assert idle["status"] == "idle" and idle["last_turn"]["key_digest"] != busy["running"]["key_digest"]
    assert _prompts(messages) == ["one", "two"]  # the cancelled turn never ran
    assert script.model_calls == 4


async def test_a_cancelled_turn_is_rolled_back_and_its_retry_runs_afresh(tmp_path: Path) -> None:
    with scripted(paced=True) as script:
        async with _served(_Conversations(script, tmp_path).app()) as http:
            script.release(len(script.script.chunks))  # the first turn's answer
            one = await http.post("/sessions/c/invocations", json={"prompt": "one"}, headers=headers(new_key()))
            key = new_key()
            two = asyncio.ensure_future(
                http.post("/sessions/c/invocations", json={"prompt": "two"}, headers=headers(key, sse=True))
            )
            script.release(2)
            await poll(lambda: _value(script.model_calls), lambda calls: calls >= 4, "answering the second turn")
            cancelling = await http.delete(f"/invocations/{key}")
            script.release(10_000)
            events = parse_sse((await asyncio.wait_for(two, WAIT)).text)
            rolled_back = await _messages(http, "c")
            calls = script.model_calls
            retry = await http.post("/sessions/c/invocations", json={"prompt": "two"}, headers=headers(key))
            messages = await _messages(http, "c")
    assert one.status_code == 200 and cancelling.status_code == 202, cancelling.text
    assert events[-1].event == "error" and events[-1].data["type"] == CANCELLED
    assert _prompts(rolled_back) == ["one"] and len(rolled_back) == 4, "the cancelled turn was not rolled back"
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert script.model_calls == calls + 2 and _prompts(messages) == ["one", "two"] and len(messages) == 8


async def _value(value: Any) -> Any:
    return value


# -- scoping -------------------------------------------------------------------------------------------------------


def _raw_ids(scope: str, session_id: str, hmac_key: bytes | None) -> str:
    return session_id  # the negative control: every caller's conv-1 is the same conversation


@pytest.mark.parametrize(
    "storage",
    [
        _sessions.session_storage_id,
        pytest.param(
            _raw_ids,
            marks=pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: unscoped ids"),
        ),
    ],
    ids=["scoped", "raw-ids"],
)
async def test_two_callers_conv_1_never_share_a_conversation(
    tmp_path: Path, storage: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sessions, "session_storage_id", storage)
    ada, bob = {"Authorization": "Bearer ada"}, {"Authorization": "Bearer bob"}
    with scripted() as script:
        conversations = _Conversations(script, tmp_path)
        async with _served(conversations.app(single_tenant=False)) as http:
            key = new_key()
            asked = await http.post(
                "/sessions/conv-1/invocations", json={"prompt": "ada's"}, headers={**headers(key), **ada}
            )
            assert asked.status_code == 200
            bob_messages = await _messages(http, "conv-1", headers=bob)
            bob_status = await http.get(f"/invocations/{key}", headers=bob)
            ada_messages = await _messages(http, "conv-1", headers=ada)
    assert _prompts(ada_messages) == ["ada's"]
    assert bob_messages == [], "bob reads ada's conversation"
    assert bob_status.status_code == 404
    assert "conv-1" not in conversations.session_ids and len(set(conversations.session_ids)) == 2


# -- another server ------------------------------------------------------------------------------------------------

LEASE = 2.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    redis_server_binary()
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def processes(tmp_path: Path, redis_url: str) -> Iterator[Processes]:
    started = Processes(tmp_path, redis_url, LEASE)
    try:
        yield started
    finally:
        started.release()
        started.stop_all()


@pytest.mark.racing
async def test_a_conversation_busy_on_another_server_is_refused_or_queued(processes: Processes) -> None:
    a = processes.start("a", hold_at_word=6)
    b = processes.start("b", mode="throw")
    c = processes.start("c", mode="enqueue")
    first, refused, queued = new_key(), new_key(), new_key()
    turn = "/sessions/conv-1/invocations"
    async with (
        httpx.AsyncClient(base_url=a, timeout=WAIT) as on_a,
        httpx.AsyncClient(base_url=b, timeout=WAIT) as on_b,
        httpx.AsyncClient(base_url=c, timeout=WAIT) as on_c,
    ):
        running = asyncio.ensure_future(on_a.post(turn, json={"prompt": "one"}, headers=headers(first)))
        await processes.until("a", "held")  # A holds the conversation, in the middle of its answer
        here = (await on_a.get("/sessions/conv-1")).json()
        there = (await on_b.get("/sessions/conv-1")).json()
        busy = await on_b.post(turn, json={"prompt": "two"}, headers=headers(refused))
        waiting = await on_c.post(turn, json={"prompt": "three"}, headers=headers(queued))
        status = await status_of(on_c, queued)
        processes.release()
        assert (await asyncio.wait_for(running, WAIT)).status_code == 200
        completed = await status_becomes(on_c, queued, "completed")
        messages = await _messages(on_b, "conv-1")
    assert here["running"]["where"] == "here" and there["running"]["where"] == "elsewhere"
    assert here["running"]["key_digest"] == there["running"]["key_digest"] and there["status"] == "busy"
    assert there["running"]["lease_seconds"] == LEASE
    body = _problem(busy, 409, SESSION_BUSY)
    assert busy.headers["retry-after"] == str(math.ceil(LEASE)) and body["retry_after"] == math.ceil(LEASE)
    assert waiting.status_code == 202 and waiting.json()["position"] == 1, waiting.text  # behind A's turn
    assert status["status"] == "queued" and status["position"] == 1
    assert completed["result"]["stop_reason"] == "end_turn"
    assert _prompts(messages) == ["one", "three"]
    assert processes.paid_by("b") == {"model": 0, "tool": 0}
