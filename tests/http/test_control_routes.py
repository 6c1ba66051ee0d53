"""The run-control and conversation routes in-process (httpx's ASGI transport): their refusals and store faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py.http import MESSAGES_UNAVAILABLE, RECORD_CORRUPTED, STORE_UNAVAILABLE, AgentApp
from strands_py.http._scopes import session_storage_id
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.keys import make_key, session_lock_key
from strands_py.idempotency.record import new_version
from strands_py.testing import ScriptedBedrock

WAIT = 10.0
PROMPT = {"prompt": "What is the weather in Paris?"}
SCOPE = "invocations"


class _FlakyStore(InMemoryIdempotencyStore):
    """Reads fail while ``failing`` (with a store error, or with anything else a client library raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: BaseException | None = None

    async def get(self, key: str) -> IdempotencyRecord | None:
        if self.failing is not None:
            raise self.failing
        return await super().get(key)

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        if self.failing is not None:
            raise self.failing
        return await super().cancel(key)


def _app(tmp_path: Path, store: InMemoryIdempotencyStore, **options: Any) -> AgentApp:
    script = ScriptedBedrock()

    def agent(request: Request, session_manager: Any = None) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager)

    async def manager(session_id: str, request: Request) -> FileSessionManager:  # an async factory
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    config = IdempotencyConfig(store=store, **options.pop("config", {}))
    return AgentApp(agent, config, single_tenant=True, session_manager=options.pop("manager", manager), **options)


@contextlib.asynccontextmanager
async def _client(app: AgentApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent", timeout=WAIT) as c:
        yield c


def _key(n: int = 1) -> dict[str, str]:
    return {"Idempotency-Key": f'"key-{n}"'}


def _type(response: httpx.Response) -> str:
    return str(response.json()["type"])


async def test_paths_that_name_no_key_or_conversation_are_404(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, InMemoryIdempotencyStore())) as http:
        for path in ("/invocations/%C3%A9", "/sessions/%C3%A9", "/sessions/%C3%A9/messages"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.delete("/invocations/%C3%A9")).status_code == 404
        assert (await http.post("/sessions/%C3%A9/invocations", json=PROMPT, headers=_key())).status_code == 404


@pytest.mark.parametrize("failure", [OSError("connection reset"), RuntimeError("driver bug")], ids=type)
async def test_a_store_that_fails_is_503_on_every_route_that_reads_it(tmp_path: Path, failure: BaseException) -> None:
    store = _FlakyStore()
    async with _client(_app(tmp_path, store)) as http:
        store.failing = failure
        answers = [
            await http.get("/invocations/key-1"),
            await http.delete("/invocations/key-1"),
            await http.get("/sessions/trip"),
            await http.post("/sessions/trip/invocations", json=PROMPT, headers=_key()),
        ]
    for answer in answers:
        assert answer.status_code == 503 and _type(answer) == STORE_UNAVAILABLE, answer.text
        assert answer.headers["retry-after"] == "1"


async def test_a_corrupted_completed_record_is_500(tmp_path: Path) -> None:
    store = InMemoryIdempotencyStore()
    key = make_key(SCOPE, "key-1")
    claim = IdempotencyRecord(key, RecordState.IN_PROGRESS, "o", new_version(), 5.0, 2e9)
    assert await store.claim(claim, 0.0) is None
    garbage = IdempotencyRecord(key, RecordState.COMPLETED, "o", new_version(), 0.0, 2e9, payload=b"\xff not json")
    assert await store.complete(garbage)
    async with _client(_app(tmp_path, store)) as http:
        answer = await http.get("/invocations/key-1")
    assert answer.status_code == 500 and _type(answer) == RECORD_CORRUPTED


async def test_a_conversation_held_by_another_server_and_by_a_dead_run_of_the_same_request(tmp_path: Path) -> None:
    store = InMemoryIdempotencyStore()
    lock = session_lock_key(SCOPE, session_storage_id(SCOPE, "trip", None))
    token = make_key(SCOPE, "key-1")
    held = IdempotencyRecord(lock, RecordState.IN_PROGRESS, "other", new_version(), 2.5, 2e9, checkpoint=None)
    assert await store.claim(held, 0.0) is None
    async with _client(_app(tmp_path, store, config={"lease_seconds": 0.3})) as http:
        state = (await http.get("/sessions/trip")).json()
        busy = await http.post("/sessions/trip/invocations", json=PROMPT, headers=_key(2))
        # The lock names this very key: a dead run of the same request, which the turn takes over, never a queue.
        dead = IdempotencyRecord(lock, RecordState.IN_PROGRESS, "dead", new_version(), 0.3, 2e9, checkpoint=None)
        assert await store.take_over(dead, held.version)
        checkpointed = IdempotencyRecord(
            lock, RecordState.IN_PROGRESS, "dead", new_version(), 0.3, 2e9, checkpoint=f'{{"v":1,"token":"{token}"}}'
        )
        assert await store.take_over(checkpointed, dead.version)
        resumed = await asyncio.wait_for(http.post("/sessions/trip/invocations", json=PROMPT, headers=_key()), WAIT)
    assert state["status"] == "busy" and state["running"] == {
        "key_digest": None,
        "where": "elsewhere",
        "lease_seconds": 2.5,
    }
    assert busy.status_code == 409 and busy.headers["retry-after"] == "3"  # the holder's lease, rounded up
    assert resumed.status_code == 200, resumed.text


async def test_messages_name_their_agent_in_the_next_link(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, InMemoryIdempotencyStore())) as http:
        assert (await http.post("/sessions/trip/invocations", json=PROMPT, headers=_key())).status_code == 200
        page = await http.get("/sessions/trip/messages", params={"limit": 2, "agent_id": "default"})
        other = await http.get("/sessions/trip/messages", params={"agent_id": "nobody"})
    assert page.json()["next"] == "/sessions/trip/messages?offset=2&limit=2&agent_id=default"
    assert other.json()["messages"] == []


async def test_a_session_manager_that_fails_makes_its_conversation_unreadable(tmp_path: Path) -> None:
    def broken(session_id: str, request: Request) -> FileSessionManager:
        raise OSError("disk gone")

    class BrokenRepository:
        def read_agent(self, session_id: str, agent_id: str) -> Any:
            raise OSError("disk gone")

    class Manager:
        session_repository = BrokenRepository()

    async with _client(_app(tmp_path, InMemoryIdempotencyStore(), manager=broken)) as http:
        unbuilt = await http.get("/sessions/trip/messages")
    async with _client(_app(tmp_path, InMemoryIdempotencyStore(), manager=lambda sid, request: Manager())) as http:
        unread = await http.get("/sessions/trip/messages")
        state = await http.get("/sessions/trip")
    for answer in (unbuilt, unread, state):
        assert answer.status_code == 500 and _type(answer) == MESSAGES_UNAVAILABLE, answer.text
