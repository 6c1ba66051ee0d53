"""The page in a real browser: headless Chromium driven by Selenium, against uvicorn on 127.0.0.1.

An app without conversations: each question is a one-off ``POST /invocations`` (``test_http_chat.py`` has the
conversations). Waits are event-driven: a ``MutationObserver`` in the page resolves an async script as soon as the
page shows what the test waits for. This module's ``browser`` fixture and ``until`` serve the other browser tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from http_support import ANSWER, WAIT, client, headers, new_key, scripted, serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strands_py.http import AgentApp
from strands_py.http._demo import DEMO_ANSWER
from strands_py.idempotency import IdempotencyConfig, IdempotencyStoreError, InMemoryIdempotencyStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PROMPT = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the browser tests: install chromium and chromium-driver")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="strands-py-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,560",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(WAIT)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


_UNTIL = """
const condition = new Function("return (" + arguments[0] + ");");
const done = arguments[arguments.length - 1];
const holds = () => { try { return Boolean(condition()); } catch (e) { return false; } };
if (holds()) { done(true); return; }
const observer = new MutationObserver(() => { if (holds()) { observer.disconnect(); done(true); } });
observer.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def until(driver: Any, condition: str) -> None:
    """Wait (at most the script timeout) until the JavaScript ``condition`` holds in the page, on its mutations."""
    assert driver.execute_async_script(_UNTIL, condition) is True, condition


def words_shown(count: int) -> str:
    answer = 'document.getElementById("answer")'
    return f'{answer} && {answer}.textContent.split(" ").filter(Boolean).length >= {count}'


def submit(driver: Any, url: str, prompt: str = PROMPT) -> None:
    driver.get(url + "/")
    driver.find_element("id", "prompt").send_keys(prompt)
    driver.find_element("id", "send").click()


def state(driver: Any) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            "const answer = document.getElementById('answer'), error = document.getElementById('error');"
            "return {answer: answer ? answer.textContent : '', state: document.body.dataset.state,"
            " corrected: document.body.dataset.corrected || null,"
            " error: error.hidden ? '' : document.getElementById('error-text').textContent,"
            " retry: !document.getElementById('retry').hidden, notice: document.body.dataset.notice || null,"
            " saved: sessionStorage.getItem('strands-py.turn'), mode: document.body.dataset.mode};"
        )
    )


def test_reload_mid_answer_reattaches_shows_the_answer_once_and_the_agent_runs_once(browser: Any) -> None:
    with scripted(paced=True, answer=DEMO_ANSWER) as script:
        with serve(AgentApp(script.factory(), page=True)) as server:
            submit(browser, server.url)
            script.release(10)
            until(browser, words_shown(10))
            saved = state(browser)["saved"]
            browser.refresh()  # mid-answer: the run holds after 10 words
            until(browser, words_shown(10))  # re-attached: the 10 words again, from the server's buffer
            assert state(browser)["saved"] == saved and state(browser)["state"] == "streaming"
            script.release()
            until(browser, 'document.body.dataset.state === "done"')
            shown = state(browser)
    assert shown["mode"] == "single"  # no session_manager=: one-off questions
    assert shown["answer"] == DEMO_ANSWER and shown["corrected"] is None  # streamed exactly, once
    assert script.model_calls == 2 and script.agents == 1


class _DropFirstStream:
    """Ends the first ``GET .../events`` response after ``after`` data events, as a proxy dropping it would."""

    def __init__(self, app: ASGIApp, after: int) -> None:
        self.app = app
        self.after = after
        self.gets: list[str | None] = []
        self.reconnected = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/events"):
            await self.app(scope, receive, send)
            return
        self.gets.append(dict(scope["headers"]).get(b"last-event-id", b"").decode() or None)
        if len(self.gets) > 1:
            self.reconnected.set()
            await self.app(scope, receive, send)
            return
        data_events, ended = 0, False

        async def dropping_send(message: Message) -> None:
            nonlocal data_events, ended
            if ended:
                return  # the client is gone as far as this response is concerned
            if message["type"] != "http.response.body":
                await send(message)
                return
            # A body may hold several frames (a follower catching up): cut it right after the ``after``-th data event.
            kept = []
            for frame in message.get("body", b"").split(b"\n\n")[:-1]:
                kept.append(frame + b"\n\n")
                if b"event: data" in frame:
                    data_events += 1
                    if data_events == self.after:
                        ended = True
                        break
            await send({**message, "body": b"".join(kept)})
            if ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app(scope, receive, dropping_send)


def test_a_dropped_stream_is_resumed_by_eventsource_with_no_chunk_missing_or_repeated(browser: Any) -> None:
    with scripted(paced=True) as script:
        app = AgentApp(script.factory(), page=True, reconnect_millis=100)
        dropper = _DropFirstStream(app, after=5)
        with serve(dropper, drain=[app]) as server:
            submit(browser, server.url)
            script.release(8)
            assert dropper.reconnected.wait(WAIT)
            until(browser, words_shown(8))
            script.release()
            until(browser, 'document.body.dataset.state === "done"')
            shown = state(browser)
    first, resumed = dropper.gets
    assert first is None and resumed is not None and resumed.endswith(":8")  # 3 events, then the 5th word
    assert shown["answer"] == " ".join(f"word{n:02d}" for n in range(1, 41)) + "."
    assert shown["corrected"] is None  # every chunk arrived once, in order: no correction by the result
    assert script.model_calls == 2


class _DownStore(InMemoryIdempotencyStore):
    async def claim(self, record: Any, now: float) -> Any:
        raise IdempotencyStoreError("unreachable")


@pytest.mark.parametrize("status", [409, 422, 503])
def test_problems_are_shown_readably(browser: Any, status: int) -> None:
    with scripted(gated=True) as script:
        shared = script.factory()(None)
        store = _DownStore() if status == 503 else InMemoryIdempotencyStore()
        factory = (lambda request: shared) if status == 409 else script.factory()
        with serve(AgentApp(factory, IdempotencyConfig(store=store), page=True)) as server:
            key = new_key()

            async def hold() -> None:
                async with client(server.url) as http:
                    await http.post("/invocations", json={"prompt": PROMPT}, headers=headers(key))

            holding = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(hold(), WAIT)), daemon=True)
            if status != 503:
                holding.start()  # a run of `key` in flight, on the shared agent
                assert script.script.entered.wait(WAIT)
            if status == 422:
                browser.get(server.url + "/")
                until(browser, 'document.body.dataset.ready === "true"')
                browser.execute_script("chat.send({prompt: arguments[1]}, arguments[1], arguments[0]);", key, "Other")
            else:
                submit(browser, server.url)
            until(browser, 'document.body.dataset.state === "error"')
            shown = state(browser)
            script.script.gate.set()
            if holding.is_alive():
                holding.join(WAIT)
    expected = {
        409: "409 Agent busy: The agent or its session is processing another request",
        422: "422 Idempotency-Key reused with a different request: This Idempotency-Key was already used",
        503: "503 Idempotency store unavailable: The idempotency store could not be reached",
    }[status]
    assert shown["error"].startswith(expected)


def test_a_turn_the_server_no_longer_knows_is_shown_lost_and_retry_runs_it_with_its_key(browser: Any) -> None:
    # What a reload shows after the server restarted with an in-memory store: the tab's turn is unknown there.
    with scripted() as script:
        with serve(AgentApp(script.factory(), page=True)) as server:
            browser.get(server.url + "/")
            key = new_key()
            turn = {"key": key, "body": {"prompt": PROMPT}, "base": 0, "label": PROMPT, "conversation": None}
            browser.execute_script("sessionStorage.setItem('strands-py.turn', arguments[0]);", json.dumps(turn))
            browser.refresh()
            until(browser, 'document.body.dataset.state === "lost"')
            lost = state(browser)
            browser.find_element("id", "retry").click()
            until(browser, 'document.body.dataset.state === "done"')
            retried = state(browser)
            footer = browser.find_element("id", "key").text
    assert lost["notice"] == "lost" and lost["retry"] and lost["error"].startswith("Answer lost: the server restarted")
    assert retried["answer"] == ANSWER and footer == key  # run anew, with the key the tab had
    assert script.model_calls == 2
