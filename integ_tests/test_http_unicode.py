"""Text that is not valid Unicode, as tools return it: every path of ``AgentApp`` serves it, and replays it.

A file name or a subprocess's output decoded with ``errors="surrogateescape"`` holds lone surrogates (the bytes
``b"report-\\xff.txt"`` become ``"report-\\udcff.txt"``). UTF-8 cannot encode them; JSON's ``\\udcff`` escape is
valid JSON text that ``json.loads`` (and a browser's ``JSON.parse``) turns back into the same string. Negative
control: ``_old_dumps``, the wire encoding before the fix, raises on the very text the tool returned.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from http_support import WAIT, client, headers, make_script, new_key, parse_sse, serve, text_of
from strands import tool

from strands_py import Agent
from strands_py.http import AgentApp
from strands_py.http._wire import dumps
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore

NAME = b"report-\xff.txt".decode("utf-8", "surrogateescape")  # what os.listdir gives for that file on Linux
ANSWER = f"I saved the weather of Paris as {NAME} for you."
PROMPT = {"prompt": "Save the weather in Paris to a file."}


class _Tools:
    """A tool with a side effect that must not repeat, answering with a surrogate-escaped file name."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def factory(self, paced: bool = False) -> tuple[Any, Any]:
        script = make_script(answer=ANSWER, paced=paced)

        @tool
        def lookup_weather(city: str) -> str:
            """Save the weather of a city to a file.

            Args:
                city: The city.
            """
            with self._lock:
                self.calls += 1
            return f"saved {city} to {NAME}"

        def make_agent(request: Any) -> Agent:
            return Agent(model=script.script.model(), tools=[lookup_weather], callback_handler=None)

        return script, make_agent


def _old_dumps(value: Any) -> bytes:
    """The wire encoding before the fix: JSON with non-ASCII kept as is, then UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("encode", [lambda value: dumps(value).encode(), _old_dumps], ids=["fixed", "old"])
def test_the_wire_encoding_of_a_lone_surrogate_is_valid_utf8_json_that_gives_it_back(encode: Any) -> None:
    value = {"text": NAME, NAME: ["é", "\ud83d\ude00", "😀"]}
    if encode is _old_dumps:
        with pytest.raises(UnicodeEncodeError):
            encode(value)
        return
    data = encode(value)
    assert b"\\udcff" in data and "é".encode() in data  # only what UTF-8 cannot carry is escaped
    assert json.loads(data.decode("utf-8")) == {"text": NAME, NAME: ["é", "😀", "😀"]}  # a split pair joins


def _tool_message(events: list[Any]) -> dict[str, Any]:
    (message,) = [e.data["message"] for e in events if e.event == "message" and e.data["message"]["role"] == "user"]
    return message  # type: ignore[no-any-return]


def _assert_valid(response: httpx.Response) -> None:
    response.content.decode("utf-8")  # strict: what went on the wire is valid UTF-8


async def test_a_tool_returning_surrogate_escaped_text_is_served_on_every_path_and_runs_once() -> None:
    tools = _Tools()
    script, make_agent = tools.factory(paced=True)
    inner = InMemoryIdempotencyStore()
    first = AgentApp(make_agent, IdempotencyConfig(store=inner))
    other = AgentApp(tools.factory()[1], IdempotencyConfig(store=inner))  # another server: replays from the store
    try:
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = new_key()
                script.release(3)
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as post:
                    assert post.status_code == 200
                    follower = asyncio.ensure_future(http.get(f"/invocations/{key}/events"))
                    script.release()
                    live = parse_sse((await asyncio.wait_for(post.aread(), WAIT)).decode("utf-8"))
                followed = await asyncio.wait_for(follower, WAIT)
                joined = await http.post("/invocations", json=PROMPT, headers=headers(key))
                resumed = await http.get(f"/invocations/{key}/events", headers={"Last-Event-ID": live[2].id})
                stored = await http2.post("/invocations", json=PROMPT, headers=headers(key))
                stored_sse = await http2.post("/invocations", json=PROMPT, headers=headers(key, sse=True))
                stored_get = await http2.get(f"/invocations/{key}/events")
    finally:
        script.release(10_000)

    assert live[-1].event == "result" and text_of(live) == ANSWER
    assert live[-1].data["text"] == ANSWER + "\n"
    assert _tool_message(live)["content"][0]["toolResult"]["content"] == [{"text": f"saved Paris to {NAME}"}]
    for response in (followed, joined, resumed, stored, stored_sse, stored_get):
        assert response.status_code == 200, response.text
        _assert_valid(response)
    assert parse_sse(followed.text) == live
    assert joined.json() == live[-1].data and joined.headers["idempotent-replayed"] == "true"
    assert parse_sse(resumed.text) == live[3:]
    # The second server has no run in memory: the result comes from the store, through the codec.
    assert stored.json() == live[-1].data and stored.headers["idempotent-replayed"] == "true"
    replay = parse_sse(stored_sse.text)
    assert [e.event for e in replay] == ["message", "result"] and replay[-1].data == live[-1].data
    assert parse_sse(stored_get.text) == replay
    assert tools.calls == 1  # the side effect ran once, whatever was asked afterwards
    assert script.model_calls == 2
