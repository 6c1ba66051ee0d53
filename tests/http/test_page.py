"""The chat page's HTML (no requests of its own, no external assets) and the demo agent it talks to in ``serve``."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py._demo import cli
from strands_py.http import AgentApp
from strands_py.http import _cli as http_cli
from strands_py.http._demo import DEMO_ANSWER, DemoAgents, demo_agent_factory, words
from strands_py.http._page import render_page
from strands_py.idempotency import IdempotencyConfig
from strands_py.testing import ScriptedBedrock
from strands_py.types.session import SessionInvocationMode

# -- the page ---------------------------------------------------------------------------------------------------------


def _script_of(page: str) -> str:
    return page[page.index("<script>") + len("<script>") : page.rindex("</script>")]


def test_the_page_is_self_contained_and_every_element_its_script_uses_exists() -> None:
    page = render_page("")
    script = _script_of(page)
    assert not re.search(r"__[A-Z]+__", page)  # every placeholder filled
    assert not re.search(r"""(src|href)\s*=|https?://|@import|url\(""", page)  # no external (or any) assets
    assert 'const BASE = "";' in script and "const CONVERSATIONS = null;" in script
    ids = set(re.findall(r'\bid="([\w-]+)"', page))
    used = set(re.findall(r'\$\("([\w-]+)"\)', script)) - {"answer"}  # #answer: set by the script on a bubble
    assert used and used <= ids, used - ids
    assert "prefers-color-scheme: dark" in page  # light and dark


@pytest.mark.parametrize(("conversations", "expected"), [(True, "true"), (False, "false"), (None, "null")])
def test_the_page_knows_whether_the_app_serves_conversations(conversations: bool | None, expected: str) -> None:
    assert f"const CONVERSATIONS = {expected};" in render_page("/agent", conversations=conversations)


def test_a_root_path_can_neither_close_the_script_nor_fill_a_placeholder() -> None:
    page = render_page("/a</script><script>alert(1)</script>__CONVERSATIONS__/")
    script = _script_of(page)
    assert "</script>" not in script and "<script>" not in script
    base = re.search(r"const BASE = (.*);", script)
    assert base is not None
    assert json.loads(base.group(1)) == "/a</script><script>alert(1)</script>__CONVERSATIONS__"
    assert "const CONVERSATIONS = null;" in script


async def test_the_app_serves_the_page_uncached_under_its_root_path() -> None:
    app = AgentApp(lambda request: Agent(callback_handler=None), page=True)
    transport = httpx.ASGITransport(app=app, root_path="/agent")
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
        response = await client.get("/agent/")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert 'const BASE = "/agent";' in response.text


# -- the demo agent ---------------------------------------------------------------------------------------------------


def test_without_a_conversation_the_demo_agent_is_the_weather_script() -> None:
    agents = demo_agent_factory(0.0)
    assert str(agents(None)("Weather in Paris?")) == DEMO_ANSWER + "\n"
    assert agents.model_calls == 0  # the weather script counts its own calls
    assert words("a  b c") == ["a  ", "b ", "c"]


class _Failing(DemoAgents):
    def on_model_call(self, number: int) -> None:
        if number == 1:
            raise RuntimeError("the first call fails")


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, DemoAgents]]:
    agents = DemoAgents(0.0)
    config = IdempotencyConfig(session_invocation_mode=SessionInvocationMode.ENQUEUE)
    app = AgentApp(agents, config, session_manager=http_cli.file_sessions(str(tmp_path)), single_tenant=True)
    async with app.lifespan():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as client:
            yield client, agents


async def _turn(client: httpx.AsyncClient, key: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/sessions/c1/invocations", json=body, headers={"Idempotency-Key": f'"{key}"'})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _approve(interrupt: dict[str, Any], approved: bool) -> dict[str, Any]:
    return {"interrupt_responses": [{"interrupt_id": interrupt["id"], "response": {"approved": approved}}]}


async def test_the_demo_conversation_remembers_asks_for_approval_and_counts_its_runs(
    chat: tuple[httpx.AsyncClient, DemoAgents],
) -> None:
    client, agents = chat
    first = await _turn(client, "k1", {"prompt": "What is the weather in Rome?"})
    second = await _turn(client, "k2", {"prompt": "and there?"})
    booking = await _turn(client, "k3", {"prompt": "Book a table for two"})
    state = (await client.get("/sessions/c1")).json()
    (interrupt,) = booking["interrupts"]
    booked = await _turn(client, "k4", _approve(interrupt, True))
    again = await _turn(client, "k4", _approve(interrupt, True))  # a double click: replayed
    declined = await _turn(client, "k5", {"prompt": "Reserve another one"})
    refused = await _turn(client, "k6", _approve(declined["interrupts"][0], False))

    assert first["text"].startswith("In Rome it is sunny, 21 degrees") and "scripted model" in first["text"]
    assert first["text"].endswith("(Model call 2 on this server.)\n")
    assert second["text"].startswith("In Paris it is sunny")  # no city named: Paris
    assert (
        'I remember this conversation: 1 question before this one, first "What is the weather in Rome?"'
        in (second["text"])
    )
    assert "scripted model" not in second["text"]
    assert booking["stop_reason"] == "interrupt" and interrupt["name"] == "approval"
    assert interrupt["reason"] == {"message": "Book a table for 2 at Le Procope, today at 20:00?", "tool": "book_table"}
    assert state["pending_interrupts"] == booking["interrupts"]
    assert booked["text"].startswith("Done. Booked: a table for 2 at Le Procope, today at 20:00 (booking 1 on")
    assert "2 questions before this one" in booked["text"]
    assert again == booked
    assert refused["text"].startswith("All right, I booked nothing.")
    assert agents.tool_runs == {"lookup_weather": 2, "book_table": 1}  # a declined booking is not made
    assert agents.model_calls == 8  # 2 per weather turn; a booking: 1 before its approval, 1 after
    assert booking["interrupts"][0]["id"] != declined["interrupts"][0]["id"]  # a fresh tool call each time


async def test_a_demo_model_call_can_be_made_to_fail(tmp_path: Path) -> None:
    agents = _Failing(0.0)
    manager = FileSessionManager(session_id="s", storage_dir=str(tmp_path))
    agent = agents(None, session_manager=manager)
    with pytest.raises(Exception, match="the first call fails"):
        await agent.invoke_async("Weather in Oslo?")
    assert str(await agent.invoke_async("Weather in Oslo?")).startswith("In Oslo it is sunny")
    assert agents.model_calls == 3


def test_the_demo_paces_its_words_when_asked() -> None:
    paced: list[int] = []
    agents = DemoAgents(pace=paced.append)
    slow = DemoAgents(0.001).pace
    assert agents.pace is not None and DemoAgents(0.0).pace is None and slow is not None
    slow(0)  # sleeps a millisecond
    script_agent = agents(None)
    assert str(script_agent("Weather?")) == DEMO_ANSWER + "\n"
    assert paced == list(range(len(words(DEMO_ANSWER))))


# -- serve: conversations -------------------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The servers ``serve`` would run (not run), and the level of ``strands_py.http`` restored afterwards."""
    servers: list[Any] = []
    monkeypatch.setattr(http_cli._AnnouncingServer, "run", lambda server: servers.append(server))
    logger = logging.getLogger("strands_py.http")
    level = logger.level
    try:
        yield servers
    finally:
        logger.setLevel(level)


def make_turn_agent(request: Any, session_manager: Any = None) -> Agent:
    script = ScriptedBedrock()
    return Agent(model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager)


def make_agent_for(request: Any) -> Agent:
    return Agent(callback_handler=None)


def test_serve_gives_the_demo_conversations_in_a_temporary_directory_removed_at_exit(
    served: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recorded(**options: Any) -> str:
        made.append(mkdtemp(**options))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recorded)
    assert cli.main(["serve", "--log-level", "warning"]) == 0
    (server,) = served
    app = server.config.app
    assert app._conversations is not None
    assert app._service.config.session_invocation_mode is SessionInvocationMode.ENQUEUE
    assert "conversations kept in a temporary directory, removed at exit" in capsys.readouterr().out
    (directory,) = made
    assert "strands-py-conversations-" in directory and not Path(directory).exists()


def test_serve_removes_its_temporary_directory_in_its_shutdown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # uvicorn re-raises a SIGTERM once its shutdown is done, which ends the process before any `finally` runs: the
    # directory must be gone when the shutdown ends.
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp
    after_shutdown: list[bool] = []

    def recorded(**options: Any) -> str:
        made.append(mkdtemp(**options))
        return made[-1]

    def run_until_stopped(server: Any) -> None:
        server.should_exit = True  # what a signal sets: started, then shut down at once
        asyncio.run(server.serve())
        after_shutdown.append(Path(made[0]).exists())

    monkeypatch.setattr(tempfile, "mkdtemp", recorded)
    monkeypatch.setattr(http_cli._AnnouncingServer, "run", run_until_stopped)
    level = logging.getLogger("strands_py.http").level
    try:
        assert cli.main(["serve", "--log-level", "warning", "--port", "0"]) == 0
    finally:
        logging.getLogger("strands_py.http").setLevel(level)
    assert after_shutdown == [False]
    assert "serving on http://127.0.0.1:" in capsys.readouterr().out


def test_serve_sessions_and_busy_options(served: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--log-level", "warning", "--single-tenant", "--sessions", str(tmp_path), "--busy", "throw"]
    assert cli.main([*argv, "--agent", f"{__name__}:make_turn_agent"]) == 0
    (server,) = served
    app = server.config.app
    assert app._conversations is not None
    assert app._service.config.session_invocation_mode is SessionInvocationMode.THROW
    assert f"conversations kept in {tmp_path}" in capsys.readouterr().out
    manager = http_cli.file_sessions(str(tmp_path))("conv-1", None)  # type: ignore[arg-type]
    assert isinstance(manager, FileSessionManager) and manager.session_id == "conv-1"


def test_serve_sessions_with_a_factory_that_takes_no_session_manager_is_an_error(
    served: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--log-level", "warning", "--sessions", str(tmp_path), "--agent", f"{__name__}:make_agent_for"]
    assert cli.main(argv) == 2
    assert served == [] and "session_manager" in capsys.readouterr().err


def test_serve_with_an_agent_and_no_sessions_serves_no_conversations(served: list[Any]) -> None:
    assert cli.main(["serve", "--log-level", "warning", "--agent", f"{__name__}:make_agent_for"]) == 0
    assert served[0].config.app._conversations is None
