"""``GET /invocations/{key}/events``: the same events and ids as the POST stream, for ``EventSource``."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from http_support import WAIT, client, headers, new_key, parse_sse, scripted, serve, text_of

from strands_py.http import NOT_FOUND, AgentApp
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.testing import CountingStore

PROMPT = {"prompt": "What is the weather in Paris?"}


async def test_get_streams_the_same_events_and_ids_as_the_post_stream_live_and_finished() -> None:
    with scripted(paced=True) as script:
        with serve(AgentApp(script.factory())) as server:
            async with client(server.url) as http:
                key = new_key()
                script.release(4)
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as post:
                    assert post.status_code == 200
                    live = asyncio.ensure_future(http.get(f"/invocations/{key}/events"))
                    script.release()
                    posted = parse_sse((await asyncio.wait_for(post.aread(), WAIT)).decode())
                followed = await asyncio.wait_for(live, WAIT)
                finished = await http.get(f"/invocations/{key}/events")
                head = await http.head(f"/invocations/{key}/events")
    assert followed.status_code == finished.status_code == 200
    assert followed.headers["content-type"].startswith("text/event-stream")
    assert followed.headers["cache-control"] == "no-store"
    assert parse_sse(followed.text) == posted == parse_sse(finished.text)
    assert head.status_code == 200 and head.content == b""
    assert script.model_calls == 2


async def test_get_of_a_result_stored_by_another_server_replays_it_as_message_and_result() -> None:
    inner = InMemoryIdempotencyStore()
    with scripted() as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        other = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                original = parse_sse(
                    (await http.post("/invocations", json=PROMPT, headers=headers(key, sse=True))).text
                )
                replayed = await http2.get(f"/invocations/{key}/events", headers={"Last-Event-ID": original[9].id})
                replay = parse_sse(replayed.text)
                resumed = await http2.get(f"/invocations/{key}/events", headers={"Last-Event-ID": replay[0].id})
                done = await http2.get(f"/invocations/{key}/events", headers={"Last-Event-ID": replay[1].id})
                posted = await http2.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
    # Another server has no buffer: the whole replay (another run tag), whatever the client had seen.
    assert replayed.status_code == 200 and replayed.headers["idempotent-replayed"] == "true"
    assert [(e.id, e.event) for e in replay] == [("r:1", "message"), ("r:2", "result")]
    assert replay[0].data["message"] == original[-1].data["message"]
    assert replay[1].data == original[-1].data
    assert parse_sse(resumed.text) == replay[1:]
    assert done.status_code == 204  # EventSource stops reconnecting
    assert parse_sse(posted.text) == replay
    assert text_of(original) + "\n" == original[-1].data["text"]
    assert script.model_calls == 2


async def test_unknown_keys_are_404_and_keys_travel_percent_encoded() -> None:
    with scripted() as script:
        with serve(AgentApp(script.factory())) as server:
            async with client(server.url) as http:
                unknown = await http.get(f"/invocations/{new_key()}/events")
                odd = 'a/b "c" %d'
                posted = await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": '"a/b \\"c\\" %d"'})
                found = await http.get(f"/invocations/{quote(odd, safe='')}/events")
                control = await http.get("/invocations/%01/events")
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["type"] == NOT_FOUND
    assert posted.status_code == 200
    assert found.status_code == 200 and parse_sse(found.text)[-1].data == posted.json()
    assert control.status_code == 404


async def test_get_waits_while_another_server_runs_the_key_then_replays() -> None:
    inner = InMemoryIdempotencyStore()
    with scripted(gated=True) as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        other = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                running = asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key)))
                assert await asyncio.wait_for(asyncio.to_thread(script.script.entered.wait, WAIT), WAIT + 5)
                waiting = asyncio.ensure_future(http2.get(f"/invocations/{key}/events"))
                script.script.gate.set()
                result = await asyncio.wait_for(running, WAIT)
                followed = await asyncio.wait_for(waiting, WAIT)
    assert followed.status_code == 200
    assert parse_sse(followed.text)[-1].data == result.json()
