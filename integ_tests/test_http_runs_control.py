"""Run control over HTTP: ``GET /invocations/{key}`` (status) and ``DELETE /invocations/{key}`` (cancel).

On a real uvicorn with httpx clients: statuses through a run's life, scoping per caller, a cancel of a run of this
server (through its agent: the turn ends through the cancelled path, a tombstone is left, a retry runs afresh), a
cancel of a run on ANOTHER server process sharing a real redis-server (the owner learns of it at its next heartbeat),
a second DELETE, a DELETE after completion, and stores that cannot cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import RedisServer, redis_server_binary
from control_support import PROMPT, Processes, poll, status_becomes, status_of
from http_support import WAIT, client, headers, new_key, parse_sse, scripted, serve

from strands_py import Agent
from strands_py.http import CANCEL_UNSUPPORTED, CANCELLED, NOT_FOUND, AgentApp
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.keys import make_key
from strands_py.testing import CountingStore
from strands_py.turn import DurableCall

SCOPE = "invocations"  # a single-tenant app's scope: its keys are make_key(SCOPE, key)


def _problem(response: httpx.Response, status: int, problem_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == problem_type and body["status"] == status and body["title"] and body["detail"]
    return body


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    with serve(app) as server:
        async with client(server.url) as http:
            yield http


# -- status --------------------------------------------------------------------------------------------------------


async def test_a_status_goes_from_404_to_running_to_completed_with_the_result() -> None:
    with scripted(paced=True) as script:
        async with _served(AgentApp(script.factory(), single_tenant=True)) as http:
            key = new_key()
            assert (await status_of(http, key))["status"] == 404
            posted = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
            running = await status_becomes(http, key, "running")
            script.release()
            answer = await asyncio.wait_for(posted, WAIT)
            completed = await status_of(http, key)
            after = await http.delete(f"/invocations/{key}")
            retry = await http.post("/invocations", json=PROMPT, headers=headers(key))
    assert running["where"] == "here" and running["lease_seconds"] == 30 and running["started_at"].endswith("Z")
    assert running["finished_at"] is None and "result" not in running
    assert completed["status"] == "completed" and completed["result"] == answer.json()
    assert completed["finished_at"] >= completed["started_at"] and "where" not in completed
    # A DELETE after completion answers the final state and changes nothing: the answer stands.
    assert after.status_code == 200 and after.json()["status"] == "completed" and "location" not in after.headers
    assert retry.headers["idempotent-replayed"] == "true" and retry.json() == answer.json()
    assert script.model_calls == 2


async def test_a_status_from_the_store_when_the_run_is_not_on_this_server() -> None:
    store = InMemoryIdempotencyStore()
    with scripted() as script:
        config = IdempotencyConfig(store=store)
        async with _served(AgentApp(script.factory(), config, single_tenant=True, retain_finished_runs=0)) as http:
            done, running = new_key(), new_key()
            answer = await http.post("/invocations", json=PROMPT, headers=headers(done))
            # Another server's claim on `running`, alive (this server never saw it).
            claim = IdempotencyRecord(make_key(SCOPE, running), RecordState.IN_PROGRESS, "other", "v1", 7.0, 2e9)
            assert await store.claim(claim, 0.0) is None
            completed, elsewhere = await status_of(http, done), await status_of(http, running)
    assert completed["status"] == "completed" and completed["result"] == answer.json()
    assert completed["started_at"] is None and completed["finished_at"] is None  # another server's: not known
    assert elsewhere == {
        "key": running,
        "status": "running",
        "where": "elsewhere",
        "lease_seconds": 7.0,
        "started_at": None,
        "finished_at": None,
    }


@pytest.mark.parametrize("single_tenant", [False, True], ids=["per-caller", "negative-control-single-tenant"])
async def test_another_caller_gets_404_for_a_key_it_does_not_own(single_tenant: bool) -> None:
    ada, bob = {"Authorization": "Bearer ada"}, {"Authorization": "Bearer bob"}
    with scripted() as script:
        async with _served(AgentApp(script.factory(), single_tenant=single_tenant)) as http:
            key = new_key()
            assert (await http.post("/invocations", json=PROMPT, headers={**headers(key), **ada})).status_code == 200
            own = await http.get(f"/invocations/{key}", headers=ada)
            other = await http.get(f"/invocations/{key}", headers=bob)
            other_delete = await http.delete(f"/invocations/{key}", headers=bob)
    assert own.status_code == 200 and own.json()["status"] == "completed"
    if single_tenant:  # one scope for all: the test above would see a leak
        assert other.status_code == other_delete.status_code == 200
        return
    _problem(other, 404, NOT_FOUND)
    _problem(other_delete, 404, NOT_FOUND)


# -- cancel on this server -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        "",
        pytest.param(
            "no-tombstone",
            marks=pytest.mark.xfail(
                raises=AssertionError, strict=True, reason="negative control: a cancelled run releases its key"
            ),
        ),
    ],
)
async def test_delete_stops_a_run_here_its_followers_get_the_cancel_and_a_retry_runs_afresh(
    broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if broken:
        # The broken variant: a cancelled run's claim is released instead of ending as a CANCELLED tombstone, so the
        # key forgets how it ended (a second DELETE, or a status request, no longer says "cancelled").
        monkeypatch.setattr(DurableCall, "end_cancelled", DurableCall.release)
    store = CountingStore(InMemoryIdempotencyStore())
    # No heartbeat within the test (one every 200 s): a run stopped here learns of its cancel from the DELETE alone. A
    # heartbeat on a slow machine would see the store's mark and leave the tombstone for the negative control too.
    config = IdempotencyConfig(store=store, lease_seconds=600)
    with scripted(paced=True) as script:
        async with _served(AgentApp(script.factory(), config, single_tenant=True)) as http:
            key = new_key()
            posted = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key, sse=True)))
            script.release(2)
            await poll(lambda: _value(script.model_calls), lambda calls: calls >= 2, "answering")  # in the answer
            followed = asyncio.ensure_future(http.get(f"/invocations/{key}/events"))
            await status_becomes(http, key, "running")
            first = await http.delete(f"/invocations/{key}")
            script.release(10_000)  # every word from here on: the cancelled model and the retry's
            events = parse_sse((await asyncio.wait_for(posted, WAIT)).text)
            followers = parse_sse((await asyncio.wait_for(followed, WAIT)).text)
            second = await http.delete(f"/invocations/{key}")
            record = await store.get(make_key(SCOPE, key))
            # A tombstone: the key is free for a retry at once, and says how its run ended until then.
            assert record is not None and record.state is RecordState.CANCELLED, record
            calls = script.model_calls
            retry = await http.post("/invocations", json=PROMPT, headers=headers(key))
            status = await status_of(http, key)
    assert first.status_code == 202 and first.json()["status"] == "cancelling", first.text
    assert first.headers["location"] == f"/invocations/{key}"
    for stream in (events, followers):
        assert stream[-1].event == "error" and stream[-1].data["type"] == CANCELLED, stream[-1]
        assert stream[-1].data["status"] == 409 and not any(e.event == "result" for e in stream)
    assert second.status_code == 200 and second.json()["status"] == "cancelled"  # idempotent: the current state
    assert second.json()["problem"]["type"] == CANCELLED
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert script.model_calls == calls + 2, "the retry did not run afresh (tool cycle and answer)"
    assert status["status"] == "completed"


async def test_delete_before_the_agent_exists_cancels_at_once_and_claims_nothing() -> None:
    building, release = threading.Event(), threading.Event()
    store = InMemoryIdempotencyStore()
    with scripted() as script:
        made = script.factory()

        def slow(request: Any) -> Agent:
            building.set()
            release.wait(WAIT)
            return made(request)

        try:
            async with _served(AgentApp(slow, IdempotencyConfig(store=store), single_tenant=True)) as http:
                key = new_key()
                posted = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
                await poll(lambda: _value(building.is_set()), bool, "building the agent")
                deleted = await http.delete(f"/invocations/{key}")
                answer = await asyncio.wait_for(posted, WAIT)
                record = await store.get(make_key(SCOPE, key))
        finally:
            release.set()
    assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled", deleted.text
    _problem(answer, 409, CANCELLED)
    assert record is None and script.model_calls == 0


async def test_delete_of_an_unknown_key_is_404_and_a_store_without_cancel_is_501() -> None:
    class OldStore(InMemoryIdempotencyStore):
        supports_cancel = False

    with scripted() as script:
        async with _served(AgentApp(script.factory(), single_tenant=True)) as http:
            unknown = await http.delete(f"/invocations/{new_key()}")
        key = new_key()
        old = AgentApp(script.factory(), IdempotencyConfig(store=OldStore()), single_tenant=True)
        async with _served(old) as http:
            assert (await http.post("/invocations", json=PROMPT, headers=headers(key))).status_code == 200
            refused = await http.delete(f"/invocations/{key}")
            still = await status_of(http, key)
    _problem(unknown, 404, NOT_FOUND)
    assert "cancel" in _problem(refused, 501, CANCEL_UNSUPPORTED)["detail"]
    assert still["status"] == "completed"


async def _value(value: Any) -> Any:
    return value


# -- cancel on another server --------------------------------------------------------------------------------------

# Renewals every 2 s: the owner learns of a cancel at its next one, and a loaded machine (whose loops may stall for a
# second) keeps its leases.
LEASE = 6.0
HOLD_AT_WORD = 6


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
async def test_delete_on_another_server_stops_the_run_where_it_runs(processes: Processes) -> None:
    a = processes.start("a", hold_at_word=HOLD_AT_WORD)
    b = processes.start("b")
    key = new_key()
    async with httpx.AsyncClient(base_url=a, timeout=WAIT) as on_a, httpx.AsyncClient(base_url=b, timeout=WAIT) as on_b:
        followed = asyncio.ensure_future(on_a.post("/invocations", json=PROMPT, headers=headers(key, sse=True)))
        await processes.until("a", "held")  # A is in the middle of the answer
        running = await status_of(on_b, key)
        first = await on_b.delete(f"/invocations/{key}")
        events = parse_sse((await asyncio.wait_for(followed, WAIT)).text)
        cancelled = await status_becomes(on_b, key, "cancelled")
        second = await on_b.delete(f"/invocations/{key}")
        retry = await on_b.post("/invocations", json=PROMPT, headers=headers(key))
        on_a_after = await status_of(on_a, key)
    assert running["status"] == "running" and running["where"] == "elsewhere" and running["lease_seconds"] == LEASE
    assert first.status_code == 202 and first.json()["status"] == "cancelling", first.text
    assert first.headers["location"] == f"/invocations/{key}"
    assert events[-1].event == "error" and events[-1].data["type"] == CANCELLED, events[-1]
    assert "result" not in [e.event for e in events]
    assert cancelled["problem"]["type"] == CANCELLED
    assert second.status_code == 200 and second.json()["status"] == "cancelled"
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert processes.paid_by("b") == {"model": 2, "tool": 1}, "the retry did not run afresh"
    assert on_a_after["status"] == "completed"  # A's status of the key: from the store, B's answer


def _marked_or_cancelled(status: dict[str, Any]) -> bool:
    """The owner's status once the cancel reached it through the store: marked, or already stopped by it."""
    if status["status"] == "cancelled":
        return bool(status.get("problem", {}).get("type") == CANCELLED)
    return bool(status["status"] == "cancelling")


class _MarklessStore(InMemoryIdempotencyStore):
    """Negative control: a cancel that marks nothing (only a run of the server that received it would stop)."""

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        return await self.get(key)


@pytest.mark.racing
@pytest.mark.parametrize(
    "store_class",
    [
        InMemoryIdempotencyStore,
        pytest.param(
            _MarklessStore,
            marks=pytest.mark.xfail(
                raises=AssertionError, strict=True, reason="negative control: without the mark the owner runs on"
            ),
        ),
    ],
)
async def test_a_cancel_reaches_the_owner_only_through_the_store(store_class: type[InMemoryIdempotencyStore]) -> None:
    config = IdempotencyConfig(store=store_class(), lease_seconds=LEASE)
    with scripted(paced=True) as script:
        owner = AgentApp(script.factory(), config, single_tenant=True)
        other = AgentApp(script.factory(), config, single_tenant=True)
        async with _served(owner) as on_a, _served(other) as on_b:
            key = new_key()
            followed = asyncio.ensure_future(on_a.post("/invocations", json=PROMPT, headers=headers(key, sse=True)))
            script.release(2)
            await poll(lambda: _value(script.model_calls), lambda calls: calls >= 2, "answering")
            first = await on_b.delete(f"/invocations/{key}")  # B does not run it: only the store can tell A
            try:
                # The owner's model is held (no word released) until it learns of the cancel at a heartbeat. Then it
                # stops: strands 1.62 ends a cancelled stream without waiting for the held model thread, so the run
                # can be "cancelled" already by the next poll (its "cancelling" lasts from the mark to the heartbeat).
                await poll(lambda: status_of(on_a, key), _marked_or_cancelled, "marked", 3 * LEASE)
            finally:
                script.release()
            events = parse_sse((await asyncio.wait_for(followed, WAIT)).text)
    assert first.status_code == 202 and first.json()["where"] == "elsewhere"
    assert events[-1].event == "error" and events[-1].data["type"] == CANCELLED, events[-1]
