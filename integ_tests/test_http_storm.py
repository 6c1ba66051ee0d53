"""A retry storm over HTTP: one key, many concurrent requests and reconnects, one run of the agent.

Negative control: ``_cancelling_frames`` cancels the run when its client disconnects (a request-owned run, the
usual design): the re-attach test must fail with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from http_support import (
    ANSWER,
    WAIT,
    Event,
    Observer,
    client,
    headers,
    new_key,
    parse_sse,
    scripted,
    serve,
    text_of,
)

from strands_py.http import AgentApp
from strands_py.http._problems import aborted_problem
from strands_py.http._runs import Run
from strands_py.http._service import InvocationService

PROMPT = {"prompt": "What is the weather in Paris?"}


async def _wait_thread_event(event: object) -> None:
    assert await asyncio.wait_for(asyncio.to_thread(event.wait, WAIT), WAIT + 5)  # type: ignore[attr-defined]


def _assert_whole_sequence(events: list[Event]) -> None:
    """One run's events, each once, in order, ending with the result; the streamed text is the answer."""
    assert len({e.run for e in events}) == 1
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    assert events[-1].event == "result"
    assert text_of(events) == ANSWER
    assert [e.data["text"] for e in events if e.event == "data"] == [w + " " for w in ANSWER.split()[:-1]] + [
        ANSWER.split()[-1]
    ]


@pytest.mark.racing
async def test_200_concurrent_requests_with_one_key_half_streaming_run_the_agent_once() -> None:
    with scripted(gated=True) as script:
        app = AgentApp(script.factory())
        observer = Observer(app, expected=200)
        with serve(observer, drain=[app]) as server:
            async with client(server.url) as http:
                key = new_key()

                async def call(streaming: bool) -> tuple[bool, object]:
                    response = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=streaming))
                    return streaming, response

                calls = [asyncio.ensure_future(call(i % 2 == 1)) for i in range(200)]
                await _wait_thread_event(observer.all_in)  # every request reached the app: now let the model answer
                script.script.gate.set()
                responses = await asyncio.wait_for(asyncio.gather(*calls), WAIT * 2)

    assert script.agents == 1
    assert script.model_calls == 2 and script.script.tool_calls == 1  # one run: a tool-use cycle
    assert all(r.status_code == 200 for _, r in responses)  # type: ignore[attr-defined]
    assert sum(r.headers.get("idempotent-replayed") != "true" for _, r in responses) == 1  # type: ignore[attr-defined]
    bodies = [r.json() for streaming, r in responses if not streaming]  # type: ignore[attr-defined]
    streams = [parse_sse(r.text) for streaming, r in responses if streaming]  # type: ignore[attr-defined]
    assert len(bodies) == len(streams) == 100
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["text"] == ANSWER + "\n" and bodies[0]["stop_reason"] == "end_turn"
    for events in streams:
        _assert_whole_sequence(events)
        assert events == streams[0]
        assert events[-1].data == bodies[0]


_following_frames = InvocationService._frames


async def _cancelling_frames(self: InvocationService, run: Run, start: int) -> AsyncIterator[bytes]:
    """Negative control: a run owned by its request, cancelled when the client goes away."""
    try:
        async for frame in _following_frames(self, run, start):
            yield frame
    finally:
        run.cancel(aborted_problem(1))


@pytest.mark.parametrize("cancel_on_disconnect", [False, pytest.param(True, marks=pytest.mark.xfail(strict=True))])
async def test_client_that_disconnects_mid_stream_and_retries_reattaches_to_the_one_run(
    cancel_on_disconnect: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cancel_on_disconnect:
        monkeypatch.setattr(InvocationService, "_frames", _cancelling_frames)
    with scripted(paced=True) as script:
        app = AgentApp(script.factory())
        observer = Observer(app)
        with serve(observer, drain=[app]) as server:
            async with client(server.url) as http:
                key = new_key()
                script.release(5)
                seen: list[Event] = []
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as first:
                    assert first.status_code == 200
                    body = ""
                    async for chunk in first.aiter_text():
                        body += chunk
                        seen = parse_sse(body.rpartition("\n\n")[0])
                        if len([e for e in seen if e.event == "data"]) == 5:
                            break
                # The client is gone (connection closed mid-answer); the server notices, the run goes on.
                await _wait_thread_event(observer.disconnected)
                script.release(1000)  # enough for any number of runs: a negative control fails on its assertions
                retry = await http.post(
                    "/invocations", json=PROMPT, headers=headers(key, sse=True, last_event_id=seen[-1].id)
                )

    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    rest = parse_sse(retry.text)
    _assert_whole_sequence(seen + rest)
    assert script.model_calls == 2 and script.agents == 1
    assert observer.errors == []


@pytest.mark.parametrize("finished", [False, True], ids=["live", "finished"])
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_last_event_id_resumes_with_exactly_the_missing_events(finished: bool, method: str) -> None:
    with scripted(paced=True) as script:
        app = AgentApp(script.factory())
        with serve(app) as server:
            async with client(server.url) as http:
                key = new_key()
                if finished:
                    script.release()
                    first = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
                    events = parse_sse(first.text)
                    _assert_whole_sequence(events)
                else:
                    script.release(12)  # the run holds after 12 words
                    async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as r:
                        body = ""
                        async for chunk in r.aiter_text():
                            body += chunk
                            events = parse_sse(body.rpartition("\n\n")[0])
                            if len([e for e in events if e.event == "data"]) == 12:
                                break
                    script.release()
                cut = 7  # the client saw events 1..7 only
                resume = {"Last-Event-ID": events[cut - 1].id}
                if method == "POST":
                    resumed = await http.post("/invocations", json=PROMPT, headers={**headers(key, sse=True), **resume})
                else:
                    resumed = await http.get(f"/invocations/{key}/events", headers=resume)
    assert resumed.status_code == 200 and resumed.headers["idempotent-replayed"] == "true"
    rest = parse_sse(resumed.text)
    assert rest[0].position == cut + 1
    _assert_whole_sequence(events[:cut] + rest)
    assert script.model_calls == 2
