"""The chat page as a chat: the demo agent's conversations in headless Chromium, against uvicorn on 127.0.0.1.

One browser and one server for the module; each test opens a conversation of its own (``?c=<id>#conversation=<id>``).
Waits are on the page's DOM (``until``: a ``MutationObserver`` resolves as soon as the condition holds) or on events
of the test's agents; nothing sleeps. ``UPDATE_SCREENSHOT=1`` saves the chat, light and dark, to ``docs/images/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_support import WAIT, Running, serve
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from test_http_browser import browser, until  # noqa: F401 - the Chromium fixture (one per module) and its wait

from strands_py.http import AgentApp
from strands_py.http._cli import file_sessions
from strands_py.http._demo import DemoAgents
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.types.session import SessionInvocationMode

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


class _Agents(DemoAgents):
    """The demo's agents, held mid-answer or failed by the test."""

    def __init__(self) -> None:
        super().__init__(pace=self._pace)
        self.hold_from: int | None = None  # the words of an answer from this index wait for `go`
        self.go = threading.Event()
        self.fail: set[int] = set()  # the numbers of the model calls that raise

    def _pace(self, index: int) -> None:
        if self.hold_from is not None and index >= self.hold_from and not self.go.wait(WAIT):
            raise TimeoutError("the test never let the answer go on")

    def on_model_call(self, number: int) -> None:
        if number in self.fail:
            raise RuntimeError("the test's model failure")

    def hold(self, from_word: int) -> None:
        self.go.clear()
        self.hold_from = from_word

    def release(self) -> None:
        self.hold_from = None
        self.go.set()


class _LoseResponse:
    """ASGI middleware: with ``armed``, the next turn's POST runs to its end on the server, and its client gets a
    502 instead of the response (a proxy that lost it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.armed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lose = scope["type"] == "http" and scope["method"] == "POST" and self.armed
        if not lose:
            await self.app(scope, receive, send)
            return
        self.armed = False

        async def discard(message: Message) -> None:
            pass

        await self.app(scope, receive, discard)  # an event stream ends with the run
        problem = {"type": "about:blank", "title": "Bad Gateway", "status": 502, "detail": "the proxy lost it"}
        await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(problem).encode()})


class _Chat:
    def __init__(self, server: Running, agents: _Agents, proxy: _LoseResponse) -> None:
        self.url = server.url
        self.agents = agents
        self.proxy = proxy

    def status(self, key: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/invocations/{key}", timeout=WAIT).json())


@pytest.fixture(scope="module")
def chat() -> Iterator[_Chat]:
    agents = _Agents()
    with tempfile.TemporaryDirectory(prefix="strands-py-chat-") as directory:
        config = IdempotencyConfig(
            store=InMemoryIdempotencyStore(), session_invocation_mode=SessionInvocationMode.ENQUEUE
        )
        app = AgentApp(
            agents,
            config,
            page=True,
            session_manager=file_sessions(directory),
            single_tenant=True,
            reconnect_millis=200,
        )
        proxy = _LoseResponse(app)
        try:
            with serve(proxy, drain=[app]) as server:
                yield _Chat(server, agents, proxy)
        finally:
            agents.release()


@pytest.fixture
def agents(chat: _Chat) -> Iterator[_Agents]:
    chat.agents.fail.clear()
    chat.agents.release()
    try:
        yield chat.agents
    finally:
        chat.agents.release()  # no model thread of this test waits past it


def open_conversation(driver: Any, url: str) -> str:
    """Open a new conversation in the current tab (a new query string, so that the page loads anew)."""
    conversation = str(uuid.uuid4())
    driver.get(f"{url}/?c={conversation}#conversation={conversation}")
    until(driver, 'document.body.dataset.ready === "true"')
    return conversation


def ask(driver: Any, prompt: str) -> None:
    """Type ``prompt`` and press Enter (which sends)."""
    driver.find_element("id", "prompt").send_keys(prompt, Keys.ENTER)


def shown(driver: Any) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            """const texts = (selector) => [...document.querySelectorAll(selector)].map((e) => e.textContent);
            return {state: document.body.dataset.state, status: document.getElementById("status").textContent,
              user: texts("#log .msg.user"), answers: texts("#log .msg.assistant"),
              tools: [...document.querySelectorAll("#log .tool")].map((e) => [e.dataset.state, e.textContent]),
              key: document.getElementById("key").textContent, notice: document.body.dataset.notice || null,
              error: document.getElementById("error").hidden ? null : document.getElementById("error-text").textContent,
              retry: !document.getElementById("retry").hidden, prompt: document.getElementById("prompt").value,
              note: texts("#log .note").join(" | ") || null, corrected: document.body.dataset.corrected || null};"""
        )
    )


DONE = 'document.body.dataset.state === "done"'


def words_shown(count: int) -> str:
    answer = 'document.getElementById("answer")'
    return f'{answer} && {answer}.textContent.split(" ").filter(Boolean).length >= {count}'


def test_a_two_turn_conversation_streams_shows_its_tool_calls_and_survives_a_reload(
    browser: Any,  # noqa: F811
    chat: _Chat,
    agents: _Agents,
) -> None:
    open_conversation(browser, chat.url)
    start = agents.model_calls
    agents.hold(3)
    ask(browser, "What is the weather in Rome?")
    until(browser, f'{words_shown(3)} && document.querySelector("#log .tool[data-state=done]")')
    midway = shown(browser)
    agents.release()
    until(browser, DONE)
    agents.hold(3)
    ask(browser, "And in Oslo?")
    second_answer = 'document.querySelectorAll("#log .msg.assistant").length === 2'
    until(browser, f"{second_answer} && {words_shown(3)}")
    browser.refresh()  # mid-answer: the first turn from the history, the second followed again with its key
    until(browser, f'document.body.dataset.ready === "true" && {second_answer} && {words_shown(3)}')
    reattached = shown(browser)
    agents.release()
    until(browser, DONE + " && " + second_answer)
    before = shown(browser)
    calls = agents.model_calls
    browser.refresh()
    until(browser, 'document.body.dataset.ready === "true" && document.querySelectorAll("#log .msg").length === 4')
    after = shown(browser)

    assert midway["state"] == "streaming" and midway["status"] == "Answering…"
    assert midway["tools"] == [
        ["done", 'lookup_weather{"city":"Rome"}Rome: sunny, 21 degrees, with a light breeze from the west']
    ]
    assert midway["answers"] == ["In Rome it "]  # streamed: the first 3 words, the rest held
    assert midway["prompt"] == ""  # Enter sent it
    assert reattached["user"] == ["What is the weather in Rome?", "And in Oslo?"] and reattached["state"] == "streaming"
    assert reattached["answers"][1] == "In Oslo it "
    assert before["user"] == ["What is the weather in Rome?", "And in Oslo?"]
    assert before["answers"][1].startswith("In Oslo it is sunny")
    assert (
        'I remember this conversation: 1 question before this one, first "What is the weather in Rome?"'
        in (before["answers"][1])
    )
    assert after["user"] == before["user"] and after["answers"] == before["answers"]
    assert [state for state, _ in after["tools"]] == ["done", "done"]
    assert after["state"] == "idle" and agents.model_calls == calls  # the history is read, nothing runs
    assert calls == start + 4  # two turns of two model calls each: the reload mid-answer ran nothing again


def test_stop_cancels_the_turn_and_the_next_question_works(
    browser: Any,  # noqa: F811
    chat: _Chat,
    agents: _Agents,
) -> None:
    open_conversation(browser, chat.url)
    agents.hold(2)
    ask(browser, "What is the weather in Lisbon?")
    until(browser, words_shown(2) + ' && !document.getElementById("stop").hidden')
    key = shown(browser)["key"]
    browser.find_element("id", "stop").click()
    until(browser, 'document.body.dataset.state === "stopped"')
    stopped = shown(browser)
    status = chat.status(key)
    agents.release()
    ask(browser, "What is the weather in Madrid?")
    until(browser, DONE)
    after = shown(browser)

    assert status["status"] == "cancelled"
    assert stopped["status"] == "Stopped" and stopped["error"] is None
    assert after["answers"][-1].startswith("In Madrid it is sunny")
    assert "I remember" not in after["answers"][-1]  # the stopped turn was rolled back: not part of the conversation


def test_an_approval_double_clicked_resumes_the_run_once(
    browser: Any,  # noqa: F811
    chat: _Chat,
    agents: _Agents,
) -> None:
    browser.set_window_size(900, 1040)
    try:
        open_conversation(browser, chat.url)
        ask(browser, "What is the weather in Paris?")
        until(browser, DONE)
        ask(browser, "Book a table for two tonight, please")
        approval = 'document.body.dataset.state === "approval" && document.querySelector(".approval .approve")'
        until(browser, approval)
        browser.refresh()  # the page asks the conversation what it waits for: the approval is shown again
        until(browser, 'document.body.dataset.ready === "true" && ' + approval)
        waiting = shown(browser)
        calls = agents.model_calls
        approve = browser.find_element("css selector", ".approval .approve")
        ActionChains(browser).double_click(approve).perform()
        until(browser, DONE)
        done = shown(browser)
        decided = browser.execute_script('return document.querySelector(".approval").dataset.decided')
        if os.environ.get("UPDATE_SCREENSHOT"):
            save_screenshots(browser)
        browser.refresh()
        until(browser, 'document.body.dataset.ready === "true"')
        reloaded = shown(browser)
        cards = browser.execute_script('return document.querySelectorAll(".approval").length')
    finally:
        browser.set_window_size(900, 560)

    assert waiting["status"] == "The agent waits for your approval"
    assert waiting["tools"][-1][0] == "waiting"  # the booking's tool call, stored without its result yet
    assert decided == "approved"
    assert agents.tool_runs["book_table"] == 1  # the double click answered once: one booking
    assert agents.model_calls == calls + 1  # the resumed run: one model call after the tool
    assert done["answers"][-1].startswith("Done. Booked: a table for 2 at Le Procope, today at 20:00 (booking 1")
    assert reloaded["answers"] == done["answers"] and reloaded["state"] == "idle" and cards == 0


def save_screenshots(driver: Any) -> None:
    IMAGES.mkdir(exist_ok=True)
    driver.save_screenshot(str(IMAGES / "chat.png"))
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        driver.save_screenshot(str(IMAGES / "chat-dark.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_retry_sends_the_same_key_a_failed_run_runs_again_a_lost_answer_is_replayed(
    browser: Any,  # noqa: F811
    chat: _Chat,
    agents: _Agents,
) -> None:
    open_conversation(browser, chat.url)
    agents.fail.add(agents.model_calls + 2)  # the turn's second model call (after its tool) fails
    ask(browser, "What is the weather in Oslo?")
    until(browser, 'document.body.dataset.state === "error"')
    failed = shown(browser)
    calls, lookups = agents.model_calls, agents.tool_runs["lookup_weather"]
    browser.find_element("id", "retry").click()
    until(browser, DONE)
    retried = shown(browser)
    after_retry, looked_up = agents.model_calls, agents.tool_runs["lookup_weather"]

    chat.proxy.armed = True  # the next answer runs, but its response is lost on the way
    ask(browser, "And in Bergen?")
    until(browser, 'document.body.dataset.state === "error"')
    lost = shown(browser)
    ran = agents.model_calls
    browser.find_element("id", "retry").click()
    until(browser, DONE)
    replayed = shown(browser)

    assert failed["retry"] and failed["error"].startswith("500 ")
    assert retried["key"] == failed["key"] and chat.status(failed["key"])["status"] == "completed"
    # The retry resumed the failed run from its journal: the first model call and the tool were not paid again,
    # only the call that failed ran again.
    assert after_retry == calls + 1 and looked_up == lookups
    assert lost["retry"] and lost["error"].startswith("502 Bad Gateway")
    assert ran == after_retry + 2  # the lost answer did run on the server
    assert replayed["key"] == lost["key"] and agents.model_calls == ran  # the retry was replayed: nothing ran again
    assert replayed["answers"][-1].startswith("In Bergen it is sunny")


def test_two_tabs_on_one_conversation_see_the_queue(
    browser: Any,  # noqa: F811
    chat: _Chat,
    agents: _Agents,
) -> None:
    conversation = open_conversation(browser, chat.url)
    first = browser.current_window_handle
    agents.hold(1)
    ask(browser, "What is the weather in Rome?")
    until(browser, words_shown(1))
    browser.switch_to.new_window("tab")
    try:
        browser.get(f"{chat.url}/?c={conversation}#conversation={conversation}")
        until(browser, 'document.body.dataset.ready === "true"')
        ask(browser, "And in Oslo?")
        until(browser, 'document.body.dataset.state === "queued"')
        queued = shown(browser)
        agents.release()
        until(browser, DONE)
        second = shown(browser)
    finally:
        browser.close()
        browser.switch_to.window(first)
    until(browser, DONE)

    assert queued["status"] == "Queued: 1 turn of this conversation ahead of yours"
    assert (
        'I remember this conversation: 1 question before this one, first "What is the weather in Rome?"'
        in (second["answers"][-1])
    )


class _Restarting:
    """Two servers behind one address: ``POST /restart`` stops the first (its runs stopped at once, their claims
    yielded) and sends everything after to the second, as a restarted server (or a load balancer) would."""

    def __init__(self, first: AgentApp, second: AgentApp) -> None:
        self.first, self.second = first, second
        self.current = first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            async with contextlib.AsyncExitStack() as stack:
                await receive()  # lifespan.startup
                await stack.enter_async_context(self.first.lifespan())
                await stack.enter_async_context(self.second.lifespan())
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "http" and scope["path"] == "/restart":
            await self.first.aclose()
            self.current = self.second
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.current(scope, receive, send)


@pytest.mark.parametrize(
    ("durable", "rewind"),
    [(True, True), (True, False), (False, True)],
    ids=["durable-store", "negative-control-a-page-ignoring-rewind", "in-memory-store"],
)
def test_a_server_restart_mid_answer_is_resumed_or_said_lost(
    browser: Any,  # noqa: F811
    agents: _Agents,
    tmp_path: Path,
    durable: bool,
    rewind: bool,
) -> None:
    shared = InMemoryIdempotencyStore()  # one store for both servers: what a durable store (Redis, DynamoDB) is

    def server(name: str) -> AgentApp:
        store = shared if durable else InMemoryIdempotencyStore()
        sessions = file_sessions(str(tmp_path / ("shared" if durable else name)))
        config = IdempotencyConfig(store=store, session_invocation_mode=SessionInvocationMode.ENQUEUE)
        options: dict[str, Any] = {"single_tenant": True, "reconnect_millis": 200, "shutdown_grace_seconds": 0}
        return AgentApp(agents, config, page=True, session_manager=sessions, **options)

    first, second = server("first"), server("second")
    with serve(_Restarting(first, second), drain=[first, second]) as running:
        open_conversation(browser, running.url)
        if not rewind:
            browser.execute_script("TurnView.prototype.withdraw = function () {};")
        agents.hold(2)
        ask(browser, "What is the weather in Rome?")
        until(browser, words_shown(2))
        calls, lookups = agents.model_calls, agents.tool_runs["lookup_weather"]
        assert httpx.post(f"{running.url}/restart", timeout=WAIT).status_code == 204
        agents.release()
        if durable:
            until(browser, DONE)
            resumed = shown(browser)
        else:
            until(browser, 'document.body.dataset.state === "lost"')
            lost = shown(browser)
            ran = agents.model_calls
            browser.find_element("id", "retry").click()
            until(browser, DONE)
            rerun = shown(browser)
    if not rewind:  # the first server's 2 words stayed, and the same words came again: the result corrects it
        assert resumed["corrected"] == "true"
    elif durable:
        # The second server resumed the turn from the journal: the tool did not run again, only the model call that
        # the first server was streaming ran again (its streamed words withdrawn by a rewind, then streamed anew).
        assert resumed["notice"] == "resumed" and resumed["error"] is None
        assert resumed["corrected"] is None  # what was streamed is what the result says: no word twice
        assert resumed["answers"] == [resumed["answers"][-1]] and resumed["answers"][0].startswith(
            "In Rome it is sunny"
        )
        assert agents.model_calls == calls + 1 and agents.tool_runs["lookup_weather"] == lookups
        assert resumed["note"] == "The server restarted: the answer was resumed where it was; nothing ran twice."
    else:
        assert (
            lost["notice"] == "lost" and lost["retry"] and lost["error"].startswith("Answer lost: the server restarted")
        )
        assert lost["status"] == "The server restarted and lost the answer"
        assert ran == calls  # nothing ran on the second server before the retry
        assert rerun["key"] == lost["key"] and rerun["answers"][-1].startswith("In Rome it is sunny")
        assert agents.model_calls == calls + 2 and agents.tool_runs["lookup_weather"] == lookups + 1  # run anew
