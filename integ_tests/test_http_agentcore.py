"""The AgentCore adapter in bedrock-agentcore's own ``BedrockAgentCoreApp``, served by uvicorn on 127.0.0.1.

AgentCore runs async entrypoints on a worker event loop of its own and sends their responses on the server's loop,
so these tests also cover runs followed from another loop than the one they run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from bedrock_agentcore.runtime import BedrockAgentCoreApp
from http_support import (
    ANSWER,
    WAIT,
    Event,
    Observer,
    Script,
    client,
    new_key,
    parse_sse,
    scripted,
    serve,
    text_of,
)

from strands_py.http import AGENT_FAILED, KEY_INVALID, KEY_MISMATCH, KEY_MISSING, SHUTTING_DOWN
from strands_py.http.agentcore import AgentCoreEntrypoint

PROMPT = "What is the weather in Paris?"
SSE = {"Accept": "text/event-stream"}


@contextlib.contextmanager
def _agentcore(script: Script, **options: Any) -> Iterator[tuple[str, AgentCoreEntrypoint, Observer]]:
    entrypoint = AgentCoreEntrypoint(script.factory(), **options)
    app = BedrockAgentCoreApp(lifespan=entrypoint.lifespan)
    entrypoint.install(app)
    observer = Observer(app)
    with serve(observer, drain=[entrypoint]) as server:
        yield server.url, entrypoint, observer


@pytest.mark.racing
async def test_concurrent_invocations_of_one_key_run_once_with_the_key_in_the_payload_or_a_header() -> None:
    with scripted(paced=True) as script, _agentcore(script) as (url, _, _):
        async with client(url) as http:
            key = new_key()

            async def call(i: int) -> httpx.Response:
                body: dict[str, Any] = {"prompt": PROMPT}
                extra = dict(SSE) if i % 2 else {}
                if i % 3 == 0:
                    extra["X-Amzn-Bedrock-AgentCore-Runtime-Custom-Idempotency-Key"] = key
                else:
                    body["idempotency_key"] = key
                return await http.post("/invocations", json=body, headers=extra)

            first = asyncio.ensure_future(call(1))
            script.release(3)
            calls = [first] + [asyncio.ensure_future(call(i)) for i in range(2, 31)]
            script.release()
            responses = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
    assert all(r.status_code == 200 for r in responses)
    results = [parse_sse(r.text)[-1].data if i % 2 else r.json() for i, r in enumerate(responses, 1)]
    assert all(result == results[0] for result in results) and results[0]["text"] == ANSWER + "\n"
    for i, response in enumerate(responses, 1):
        if i % 2:
            events = parse_sse(response.text)
            assert [e.position for e in events] == list(range(1, len(events) + 1)) and text_of(events) == ANSWER
    assert script.model_calls == 2 and script.agents == 1


async def test_disconnect_then_resume_with_the_last_event_id_in_the_payload() -> None:
    with scripted(paced=True) as script, _agentcore(script) as (url, entrypoint, observer):
        settled = threading.Event()
        track = entrypoint._track

        def tracked(run: Any, started: bool) -> None:
            track(run, started)
            if not started:
                settled.set()

        entrypoint._service._on_run = tracked
        async with client(url) as http:
            key = new_key()
            script.release(5)
            seen: list[Event] = []
            body = {"prompt": PROMPT, "idempotency_key": key}
            async with http.stream("POST", "/invocations", json=body, headers=SSE) as first:
                text = ""
                async for chunk in first.aiter_text():
                    text += chunk
                    seen = parse_sse(text.rpartition("\n\n")[0])
                    if len([e for e in seen if e.event == "data"]) == 5:
                        break
            assert await asyncio.wait_for(asyncio.to_thread(observer.disconnected.wait, WAIT), WAIT + 5)
            busy = (await http.get("/ping")).json()["status"]
            script.release()
            resumed = await http.post("/invocations", json={**body, "last_event_id": seen[-1].id}, headers=SSE)
            rest = parse_sse(resumed.text)
            assert await asyncio.wait_for(asyncio.to_thread(settled.wait, WAIT), WAIT + 5)  # stored, task ended
            idle = (await http.get("/ping")).json()["status"]
    assert busy == "HealthyBusy" and idle == "Healthy"  # AgentCore keeps the session while the run goes on
    assert resumed.headers["idempotent-replayed"] == "true"
    events = seen + rest
    assert [e.position for e in events] == list(range(1, len(events) + 1)) and text_of(events) == ANSWER
    assert script.model_calls == 2


@pytest.mark.parametrize(
    ("body", "extra", "status", "problem_type"),
    [
        ({"prompt": PROMPT}, {}, 400, KEY_MISSING),
        ({"prompt": PROMPT, "idempotency_key": ""}, {}, 400, KEY_INVALID),
        ({"prompt": PROMPT, "idempotency_key": "a"}, {"Idempotency-Key": '"b"'}, 400, KEY_INVALID),
        (
            {"prompt": PROMPT, "idempotency_key": "a", "color": "red"},
            {},
            400,
            "tag:strands-py,2025:problem/invalid-body",
        ),
    ],
)
async def test_bad_requests_are_problems(body: Any, extra: dict[str, str], status: int, problem_type: str) -> None:
    with scripted() as script, _agentcore(script) as (url, _, _):
        async with client(url) as http:
            response = await http.post("/invocations", json=body, headers=extra)
    assert response.status_code == status and response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == problem_type
    assert script.model_calls == 0


async def test_key_reuse_failures_and_shutdown_are_problems() -> None:
    with scripted(fail_with=RuntimeError("boom")) as failing, _agentcore(failing) as (url, entrypoint, _):
        async with client(url) as http:
            failed = await http.post("/invocations", json={"prompt": PROMPT, "idempotency_key": "k1"})
            failing.script.fail_with = None
            ok = await http.post("/invocations", json={"prompt": PROMPT, "idempotency_key": "k1"})
            mismatch = await http.post("/invocations", json={"prompt": "other", "idempotency_key": "k1"}, headers=SSE)
            await asyncio.wait_for(entrypoint.aclose(), WAIT)
            closed = await http.post("/invocations", json={"prompt": PROMPT, "idempotency_key": "k2"})
    assert failed.status_code == 500 and failed.json()["type"] == AGENT_FAILED
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
    assert mismatch.status_code == 422 and mismatch.json()["type"] == KEY_MISMATCH
    assert closed.status_code == 503 and closed.json()["type"] == SHUTTING_DOWN
