"""Every status code of ``AgentApp``, on a real uvicorn: RFC 9457 problems, ``Retry-After`` where retrying helps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from http_support import WAIT, client, headers, new_key, parse_sse, scripted, serve
from starlette.exceptions import HTTPException

from strands_py import Agent
from strands_py.http import (
    ABORTED,
    AGENT_BUSY,
    AGENT_FAILED,
    BODY_TOO_LARGE,
    IN_PROGRESS_ELSEWHERE,
    INVALID_BODY,
    KEY_INVALID,
    KEY_MISMATCH,
    KEY_MISSING,
    LEASE_LOST,
    NOT_REPLAYABLE,
    RECORD_CORRUPTED,
    RUN_TIMEOUT,
    SHUTTING_DOWN,
    STORE_UNAVAILABLE,
    TOO_MANY_RUNS,
    UNSUPPORTED_MEDIA_TYPE,
    AgentApp,
)
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyLeaseLostError,
    IdempotencyRecord,
    IdempotencyStoreError,
    InMemoryIdempotencyStore,
    RecordState,
)
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.testing import CountingStore
from strands_py.types.exceptions import IdempotencyAbortedError, IdempotencyTokenError, ReentrantInvocationError

PROMPT = {"prompt": "What is the weather in Paris?"}


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


# -- the request --------------------------------------------------------------------------------------------------


async def test_missing_and_malformed_keys_are_400_and_nothing_runs() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            _problem(await http.post("/invocations", json=PROMPT), 400, KEY_MISSING)
            for bad in ['"open', '"a";p=1', "a b", '""', "a,b", '"\\x"', "x" * 256]:
                response = await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": bad})
                _problem(response, 400, KEY_INVALID)
            twice = [("Idempotency-Key", '"a"'), ("Idempotency-Key", '"a"')]
            _problem(await http.post("/invocations", json=PROMPT, headers=twice), 400, KEY_INVALID)
    assert script.model_calls == 0


async def test_quoted_and_bare_forms_name_the_same_key() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            key = new_key()
            first = await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": f'"{key}"'})
            bare = await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": key})
            spaced = await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": '"a key \\"quoted\\""'})
    assert first.status_code == bare.status_code == spaced.status_code == 200
    assert "idempotent-replayed" not in first.headers and bare.headers["idempotent-replayed"] == "true"
    assert bare.json() == first.json()
    assert script.model_calls == 4  # two runs: the uuid key, and the quoted key with spaces


@pytest.mark.parametrize("last_event_id", [b"r:\xb2", b"x:" + b"7" * 5000, b"\xff\xfe:1", b"r:" + b"9" * 19])
async def test_a_last_event_id_that_is_not_ours_is_ignored_never_a_500(last_event_id: bytes) -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            key = new_key()
            posted = await http.post(
                "/invocations", json=PROMPT, headers={**headers(key, sse=True), "Last-Event-ID": last_event_id}
            )
            followed = await http.get(f"/invocations/{key}/events", headers={"Last-Event-ID": last_event_id})
    assert posted.status_code == followed.status_code == 200, posted.text
    events = parse_sse(posted.text)
    assert events[0].position == 1 and events[-1].event == "result"  # the whole sequence
    assert parse_sse(followed.text) == events
    assert script.model_calls == 2


async def test_keyless_requests_run_each_time_when_keys_are_optional() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory(), require_key=False)) as http:
            one = await http.post("/invocations", json=PROMPT)
            two = await http.post("/invocations", json=PROMPT, headers={"Accept": "text/event-stream"})
    assert one.status_code == two.status_code == 200
    assert parse_sse(two.text)[-1].data["text"] == one.json()["text"]
    assert script.model_calls == 4


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{", "application/json"), (b'{"prompt": NaN}', "application/json"), (b"[" * 100_000, "application/json")],
    ids=["truncated", "nan", "deep"],
)
async def test_body_that_is_not_json_is_400(content: bytes, content_type: str) -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            response = await http.post(
                "/invocations", content=content, headers={"Content-Type": content_type, **headers(new_key())}
            )
    _problem(response, 400, INVALID_BODY)


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"prompt": ""},
        {"prompt": 3},
        {"prompt": []},
        {"prompt": ["text"]},
        {"prompt": "hi", "stream": True},
        {"prompt": [{"image": {"format": "png", "source": {"bytes": "not base64!"}}}]},
    ],
)
async def test_body_of_the_wrong_shape_is_400(body: Any) -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            _problem(await http.post("/invocations", json=body, headers=headers(new_key())), 400, INVALID_BODY)
    assert script.model_calls == 0


async def test_content_blocks_with_base64_images_reach_the_agent_as_bytes() -> None:
    seen: list[Any] = []
    with scripted() as script:
        make = script.factory()

        def factory(request: Any) -> Agent:
            agent = make(request)
            original = agent.stream_async

            def spy(prompt: Any, **kwargs: Any) -> Any:
                seen.append(prompt)
                return original(prompt, **kwargs)

            agent.stream_async = spy  # type: ignore[method-assign]
            return agent

        blocks = [{"text": "What is this?"}, {"image": {"format": "png", "source": {"bytes": "iVBORw0K"}}}]
        async with _served(AgentApp(factory)) as http:
            response = await http.post("/invocations", json={"prompt": blocks}, headers=headers(new_key()))
    assert response.status_code == 200
    assert seen == [[{"text": "What is this?"}, {"image": {"format": "png", "source": {"bytes": b"\x89PNG\r\n"}}}]]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_wrong_content_type_is_415(content_type: str | None) -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            extra = {"Content-Type": content_type} if content_type else {}
            response = await http.post("/invocations", content=b'{"prompt":"hi"}', headers={**headers("k"), **extra})
            ok = await http.post(
                "/invocations",
                content=b'{"prompt":"hi"}',
                headers={**headers(new_key()), "Content-Type": "application/vnd.api+json; charset=utf-8"},
            )
    _problem(response, 415, UNSUPPORTED_MEDIA_TYPE)
    assert ok.status_code == 200


async def test_body_over_the_limit_is_413_declared_or_streamed() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    with scripted() as script:
        async with _served(AgentApp(script.factory(), max_body_bytes=1000)) as http:
            declared = await http.post("/invocations", json={"prompt": "x" * 2000}, headers=headers(new_key()))
            streamed = await http.post(
                "/invocations",
                content=chunks(),
                headers={**headers(new_key()), "Content-Type": "application/json"},
            )
            fits = await http.post("/invocations", json={"prompt": "x" * 900}, headers=headers(new_key()))
    _problem(declared, 413, BODY_TOO_LARGE)
    assert "content-length" not in streamed.request.headers  # chunked: the limit is enforced while reading
    _problem(streamed, 413, BODY_TOO_LARGE)
    assert fits.status_code == 200
    assert script.model_calls == 2


async def test_other_paths_and_methods_are_404_and_405() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory())) as http:
            missing = await http.get("/nowhere")
            wrong = await http.get("/invocations")
    _problem(missing, 404, "about:blank")
    _problem(wrong, 405, "about:blank")
    assert wrong.headers["allow"] == "POST"


# -- the key's record ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sse", [False, True])
async def test_key_reused_with_another_prompt_is_422_while_live_and_after(sse: bool) -> None:
    inner = InMemoryIdempotencyStore()
    with scripted(gated=True) as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        other = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                running = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
                assert await asyncio.wait_for(asyncio.to_thread(script.script.entered.wait, WAIT), WAIT + 5)
                live = await http.post("/invocations", json={"prompt": "another"}, headers=headers(key, sse=sse))
                script.script.gate.set()
                assert (await asyncio.wait_for(running, WAIT)).status_code == 200
                stored = await http2.post("/invocations", json={"prompt": "another"}, headers=headers(key, sse=sse))
    _problem(live, 422, KEY_MISMATCH)  # joined in-app: the fingerprints differ
    _problem(stored, 422, KEY_MISMATCH)  # another server: the store's fingerprint differs
    assert script.model_calls == 2


async def test_running_elsewhere_past_the_wait_deadline_is_409_with_retry_after() -> None:
    inner = InMemoryIdempotencyStore()
    with scripted(gated=True) as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        impatient = AgentApp(
            script.factory(),
            IdempotencyConfig(store=CountingStore(inner), wait_timeout_seconds=0.05),
            retry_after_seconds=7,
        )
        with serve(first) as one, serve(impatient) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                running = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
                assert await asyncio.wait_for(asyncio.to_thread(script.script.entered.wait, WAIT), WAIT + 5)
                waited = await http2.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
                followed = await http2.get(f"/invocations/{key}/events")
                script.script.gate.set()
                assert (await asyncio.wait_for(running, WAIT)).status_code == 200
                later = await http2.post("/invocations", json=PROMPT, headers=headers(key))
    for response in (waited, followed):
        body = _problem(response, 409, IN_PROGRESS_ELSEWHERE)
        assert response.headers["retry-after"] == "7" and body["retry_after"] == 7
    assert later.status_code == 200 and later.headers["idempotent-replayed"] == "true"
    assert script.model_calls == 2


async def test_another_request_while_the_shared_agent_is_busy_is_409() -> None:
    with scripted(gated=True) as script:
        shared = script.factory()(None)
        async with _served(AgentApp(lambda request: shared)) as http:
            running = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(new_key())))
            assert await asyncio.wait_for(asyncio.to_thread(script.script.entered.wait, WAIT), WAIT + 5)
            busy = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
            script.script.gate.set()
            assert (await asyncio.wait_for(running, WAIT)).status_code == 200
    _problem(busy, 409, AGENT_BUSY)
    assert busy.headers["retry-after"] == "1"


async def test_result_too_large_to_replay_is_410_and_does_not_run_again() -> None:
    inner = InMemoryIdempotencyStore(max_result_bytes=16)
    with scripted() as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        other = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                original = await http.post("/invocations", json=PROMPT, headers=headers(key))
                retry = await http2.post("/invocations", json=PROMPT, headers=headers(key))
                followed = await http2.get(f"/invocations/{key}/events")
    assert original.status_code == 200  # the first caller got its result
    _problem(retry, 410, NOT_REPLAYABLE)
    _problem(followed, 410, NOT_REPLAYABLE)
    assert script.model_calls == 2


async def test_corrupted_record_is_500() -> None:
    store = InMemoryIdempotencyStore()
    key = new_key()
    durable = make_key("invocations", key)
    now = time.time()
    record = IdempotencyRecord(durable, RecordState.IN_PROGRESS, "owner", new_version(), 60.0, now + 60)
    assert await store.claim(record, now) is None
    completed = IdempotencyRecord(
        durable, RecordState.COMPLETED, "owner", new_version(), 0.0, now + 60, payload=b"z not zlib"
    )
    assert await store.complete(completed)
    with scripted() as script:
        app = AgentApp(script.factory(), IdempotencyConfig(store=store), single_tenant=True)  # the key's scope
        async with _served(app) as http:
            posted = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
            followed = await http.get(f"/invocations/{key}/events")
    _problem(posted, 500, RECORD_CORRUPTED)
    _problem(followed, 500, RECORD_CORRUPTED)
    assert script.model_calls == 0


class _DownStore(CountingStore):
    """A store whose backend is unreachable until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__(InMemoryIdempotencyStore())
        self.up = False

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        if not self.up:
            raise IdempotencyStoreError("store unreachable") from ConnectionError("refused")
        return await super().claim(record, now)

    async def get(self, key: str) -> IdempotencyRecord | None:
        if not self.up:
            raise IdempotencyStoreError("store unreachable") from ConnectionError("refused")
        return await super().get(key)


async def test_store_unavailable_is_503_with_retry_after_and_the_retry_runs() -> None:
    store = _DownStore()
    with scripted() as script:
        async with _served(AgentApp(script.factory(), IdempotencyConfig(store=store), retry_after_seconds=2)) as http:
            key = new_key()
            down = await http.post("/invocations", json=PROMPT, headers=headers(key))
            followed = await http.get(f"/invocations/{key}/events")
            store.up = True
            retry = await http.post("/invocations", json=PROMPT, headers=headers(key))
    for response in (down, followed):
        _problem(response, 503, STORE_UNAVAILABLE)
        assert response.headers["retry-after"] == "2"
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert script.model_calls == 2


class _RaisingAgent(Agent):
    error: BaseException = RuntimeError()

    async def stream_async(self, prompt: Any = None, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        raise self.error
        yield  # an async generator


@pytest.mark.parametrize(
    ("error", "status", "problem_type", "retry_after"),
    [
        (IdempotencyLeaseLostError("k", "taken over"), 409, LEASE_LOST, True),
        (IdempotencyAbortedError(), 503, ABORTED, True),
        (ReentrantInvocationError(), 409, AGENT_BUSY, True),
        (IdempotencyTokenError(), 400, KEY_INVALID, False),
        (HTTPException(403, "not yours"), 403, "about:blank", False),
        (RuntimeError("the prompt was 'secret'"), 500, AGENT_FAILED, False),
    ],
)
async def test_what_the_agent_raises_maps_onto_a_problem(
    error: BaseException, status: int, problem_type: str, retry_after: bool
) -> None:
    def factory(request: Any) -> Agent:
        agent = _RaisingAgent(callback_handler=None)
        agent.error = error
        return agent

    async with _served(AgentApp(factory)) as http:
        response = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
    body = _problem(response, status, problem_type)
    assert ("retry-after" in response.headers) is retry_after
    assert "secret" not in response.text and "Paris" not in response.text
    if status == 403:
        assert body["detail"] == "not yours"


async def test_agent_failure_is_500_not_stored_and_the_retry_runs_again() -> None:
    with scripted(fail_with=RuntimeError("model exploded")) as script:
        async with _served(AgentApp(script.factory())) as http:
            key = new_key()
            failed = await http.post("/invocations", json=PROMPT, headers=headers(key))
            streamed = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
            script.script.fail_with = None
            retry = await http.post("/invocations", json=PROMPT, headers=headers(key))
    _problem(failed, 500, AGENT_FAILED)
    _problem(streamed, 500, AGENT_FAILED)  # failed before any event: a status, not a stream
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert script.model_calls == 4  # two failed attempts, then the tool-use cycle


async def test_failure_mid_stream_ends_the_stream_with_an_error_event() -> None:
    def pace(index: int) -> None:
        if index == 3:
            raise ConnectionResetError("stream broke")

    with scripted() as script:
        script.script.pace = pace
        async with _served(AgentApp(script.factory())) as http:
            key = new_key()
            response = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
            resumed = await http.get(f"/invocations/{key}/events", headers={"Last-Event-ID": "x:0"})
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert [e.event for e in events][-4:] == ["data", "data", "data", "error"]
    assert events[-1].data["status"] == 500 and events[-1].data["type"] == AGENT_FAILED
    assert parse_sse(resumed.text) == events  # a reconnect sees how it ended


async def test_run_longer_than_the_timeout_is_504_and_its_claim_is_released() -> None:
    inner = InMemoryIdempotencyStore()
    with scripted(gated=True) as script, scripted() as patient:
        hasty = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)), run_timeout_seconds=0.2)
        other = AgentApp(patient.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(hasty) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                timed_out = await http.post("/invocations", json=PROMPT, headers=headers(key))
                script.script.gate.set()  # the abandoned model call ends, so that the server's loop can close
                retry = await http2.post("/invocations", json=PROMPT, headers=headers(key))
    _problem(timed_out, 504, RUN_TIMEOUT)
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers  # the claim was released
    assert patient.model_calls == 2


async def test_too_many_runs_is_503_with_retry_after() -> None:
    with scripted(gated=True) as script:
        async with _served(AgentApp(script.factory(), max_concurrent_runs=1)) as http:
            key = new_key()
            running = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
            assert await asyncio.wait_for(asyncio.to_thread(script.script.entered.wait, WAIT), WAIT + 5)
            refused = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
            joined = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
            script.script.gate.set()
            results = await asyncio.wait_for(asyncio.gather(running, joined), WAIT)
    _problem(refused, 503, TOO_MANY_RUNS)
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in results] == [200, 200]  # joining a run is never refused


async def test_after_close_new_invocations_are_503() -> None:
    with scripted() as script:
        app = AgentApp(script.factory())
        async with _served(app) as http:
            await asyncio.wait_for(app.aclose(), WAIT)
            refused = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
    _problem(refused, 503, SHUTTING_DOWN)
    assert refused.headers["retry-after"] == "1"
