"""Humans in the loop over HTTP, in-process (httpx's ASGI transport): interrupts in results, answers bound to them.

A turn that stops for a human is a completed invocation whose body lists its ``interrupts``; the client answers with
``{"interrupt_responses": [...]}`` and a new key. The same key again replays the answer; an answer to an interrupt
that is not pending is 409 ``interrupt-stale``, a prompt while interrupts are pending 409 ``interrupts-pending``,
both with ``pending``, and neither runs anything. (The module is not named ``test_interrupts.py``: that basename is
``tests/session``'s, and pytest's default import mode refuses two test modules of one basename.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from strands import ToolContext, tool
from strands.interrupt import Interrupt
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent, InterruptResponseStaleError, InterruptsPendingError
from strands_py.agent import _gate
from strands_py.http import INVALID_BODY, KEY_MISMATCH, AgentApp
from strands_py.http._problems import AGENT_FAILED, INTERRUPT_STALE, INTERRUPTS_PENDING, problem_for
from strands_py.http._protocol import ProblemError, parse_invocation
from strands_py.idempotency import IdempotencyConfig, codec
from strands_py.session import _turn
from strands_py.testing import ScriptedBedrock

WAIT = 20.0
PROMPT = {"prompt": "What is the weather in Paris?"}
APPROVE = {"approved": True}


class Approvals(ScriptedBedrock):
    """The script's tool asks for an approval (``{"approved": bool}``, as the demo's) before it acts."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.acted = 0
        self._count = threading.Lock()

    def tools(self) -> list[Any]:
        script = self

        @tool(context=True)
        def lookup_weather(city: str, tool_context: ToolContext) -> str:
            """Look up the weather, once a human approved it.

            Args:
                city: The city.
            """
            answer = tool_context.interrupt("approval", reason={"city": city})
            if not (isinstance(answer, dict) and answer.get("approved") is True):
                return "not approved"
            with script._count:
                script.acted += 1
            return f"{city}: sunny"

        return [lookup_weather]


def _app(tmp_path: Path, script: ScriptedBedrock, *, sessions: bool = True, **options: Any) -> AgentApp:
    model = script.model()  # one for every agent: a boto3 client costs a few hundred milliseconds to build

    def agent(request: Request, session_manager: Any = None) -> Agent:
        return Agent(model=model, tools=script.tools(), callback_handler=None, session_manager=session_manager)

    def manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    if sessions:
        options["session_manager"] = manager
    return AgentApp(agent, IdempotencyConfig(), single_tenant=True, **options)


@contextlib.asynccontextmanager
async def _client(app: AgentApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent", timeout=WAIT) as c:
        yield c


def _key(name: str, *, sse: bool = False) -> dict[str, str]:
    headers = {"Idempotency-Key": f'"{name}"'}
    if sse:
        headers["Accept"] = "text/event-stream"
    return headers


def _answer(interrupt_id: str, response: Any = APPROVE) -> dict[str, Any]:
    return {"interrupt_responses": [{"interrupt_id": interrupt_id, "response": response}]}


def _problem(response: httpx.Response, status: int, problem_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == problem_type and body["status"] == status, body
    assert "Retry-After" not in response.headers  # the same request would meet the same state
    return body


def _result_of_stream(text: str) -> dict[str, Any]:
    """The data of an event stream's ``result`` event."""
    blocks = [block for block in text.split("\n\n") if "event: result" in block]
    assert len(blocks) == 1, text
    return dict(json.loads(blocks[0].split("data: ", 1)[1]))


async def _ask(http: httpx.AsyncClient, session: str = "trip-1", key: str = "ask-1") -> dict[str, Any]:
    """A turn that stops for an approval: its single interrupt."""
    asked = await http.post(f"/sessions/{session}/invocations", json=PROMPT, headers=_key(key))
    assert asked.status_code == 200, asked.text
    body = asked.json()
    assert body["stop_reason"] == "interrupt" and len(body["interrupts"]) == 1, body
    interrupt: dict[str, Any] = body["interrupts"][0]
    return interrupt


# -- the body ------------------------------------------------------------------------------------------------------


def test_an_answer_body_becomes_strands_resume_prompt() -> None:
    parsed = parse_invocation({"interrupt_responses": [{"interrupt_id": "a", "response": {"approved": False}}]})
    assert parsed.answers and parsed.prompt == [
        {"interruptResponse": {"interruptId": "a", "response": {"approved": False}}}
    ]
    assert not parse_invocation(PROMPT).answers


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "interrupt_responses": [{"interrupt_id": "a", "response": 1}]},  # both
        {},  # neither
        {"interrupt_responses": []},
        {"interrupt_responses": "a"},
        {"interrupt_responses": ["a"]},
        {"interrupt_responses": [{"interrupt_id": "a"}]},
        {"interrupt_responses": [{"interrupt_id": "a", "response": 1, "extra": 2}]},
        {"interrupt_responses": [{"interrupt_id": "", "response": 1}]},
        {"interrupt_responses": [{"interrupt_id": 7, "response": 1}]},
        {"interrupt_responses": [{"interrupt_id": "a", "response": None}]},  # strands would ask again
        {"interrupt_responses": [{"interrupt_id": "a", "response": 1}, {"interrupt_id": "a", "response": 2}]},
    ],
    ids=lambda body: str(body)[:60],
)
def test_malformed_answer_bodies_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(ProblemError) as refused:
        parse_invocation(body)
    assert refused.value.problem.status == 400 and refused.value.problem.type == INVALID_BODY


def test_the_interrupt_problems_carry_what_is_pending() -> None:
    waiting = [Interrupt(id="i-1", name="approval", reason={"city": "Paris"}, response=None)]
    stale = problem_for(InterruptResponseStaleError(["i-0"], waiting), 1)
    pending = problem_for(InterruptsPendingError(waiting), 1)
    assert (stale.status, stale.type, pending.status, pending.type) == (409, INTERRUPT_STALE, 409, INTERRUPTS_PENDING)
    for problem in (stale, pending):
        # What an event stream's `error` event carries is the same object, `pending` included; never a response.
        assert problem.body()["pending"] == [{"id": "i-1", "name": "approval", "reason": {"city": "Paris"}}]
        assert problem.retry_after is None and '"pending":[{"id":"i-1"' in problem.json()


# -- the flow ------------------------------------------------------------------------------------------------------


async def test_a_run_that_did_not_interrupt_says_so(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, ScriptedBedrock(), sessions=False)) as http:
        plain = await http.post("/invocations", json=PROMPT, headers=_key("plain"))
        streamed = await http.post("/invocations", json=PROMPT, headers=_key("streamed", sse=True))
    assert plain.json()["interrupts"] == [] and _result_of_stream(streamed.text)["interrupts"] == []


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_an_interrupt_is_answered_once_and_the_double_click_replays(tmp_path: Path, sse: bool) -> None:
    script = Approvals()
    async with _client(_app(tmp_path, script)) as http:
        interrupt = await _ask(http)
        assert interrupt["name"] == "approval" and interrupt["reason"] == {"city": "Paris"} and script.acted == 0
        assert (await http.get("/sessions/trip-1")).json()["pending_interrupts"] == [interrupt]

        first, second = await asyncio.gather(
            *(
                http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key("yes", sse=sse))
                for _ in range(2)
            )
        )
        third = await http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key("yes"))
        state = (await http.get("/sessions/trip-1")).json()

    bodies = [_result_of_stream(r.text) if sse else r.json() for r in (first, second)] + [third.json()]
    assert [b["stop_reason"] for b in bodies] == ["end_turn"] * 3 and bodies[0]["interrupts"] == []
    assert len({b["text"] for b in bodies}) == 1 and script.acted == 1  # one resumed turn for three clicks
    assert third.headers["Idempotent-Replayed"] == "true"
    assert state["pending_interrupts"] == [] and state["status"] == "idle"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a new key per click is a new answer")
async def test_negative_control_a_double_click_with_a_key_per_click_is_refused(tmp_path: Path) -> None:
    script = Approvals()
    async with _client(_app(tmp_path, script)) as http:
        interrupt = await _ask(http)
        clicks = [
            await http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key(f"yes-{n}"))
            for n in range(2)
        ]
    assert [click.status_code for click in clicks] == [200, 200] and script.acted == 1


async def test_an_answer_to_an_interrupt_answered_already_is_stale_and_its_key_stays_free(tmp_path: Path) -> None:
    script = Approvals()
    async with _client(_app(tmp_path, script)) as http:
        interrupt = await _ask(http)
        await http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key("yes"))
        for sse in (False, True):  # an event-stream client gets the status too: nothing was streamed
            late = await http.post(
                "/sessions/trip-1/invocations",
                json=_answer(interrupt["id"], {"approved": False}),
                headers=_key("no", sse=sse),
            )
            assert _problem(late, 409, INTERRUPT_STALE)["pending"] == []
        status = (await http.get("/invocations/no")).json()
        # Not sticky: the refused key, with a request that fits the conversation, runs.
        again = await http.post("/sessions/trip-1/invocations", json=PROMPT, headers=_key("no"))

    assert status["status"] == "failed" and status["problem"]["type"] == INTERRUPT_STALE and script.acted == 1
    assert again.status_code == 200 and again.json()["stop_reason"] == "interrupt"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: no interrupt check under the lock")
async def test_negative_control_without_the_check_a_stale_answer_is_not_a_409(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn, "check_interrupts", lambda agent, prompt: None)
    await test_an_answer_to_an_interrupt_answered_already_is_stale_and_its_key_stays_free(tmp_path)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: the refused claim is yielded")
async def test_negative_control_a_refused_claim_kept_makes_its_key_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal goes unnoticed: the claim is yielded (its journal kept) as for any run that ended without a result.
    monkeypatch.setattr(_gate._Refusal, "refused", lambda self, error: False)
    await test_an_answer_to_an_interrupt_answered_already_is_stale_and_its_key_stays_free(tmp_path)


async def test_a_new_prompt_while_an_interrupt_is_pending_is_refused_with_it(tmp_path: Path) -> None:
    script = Approvals()
    async with _client(_app(tmp_path, script)) as http:
        interrupt = await _ask(http)
        refused = await http.post("/sessions/trip-1/invocations", json={"prompt": "And in Rome?"}, headers=_key("rome"))
        unknown = await http.post("/sessions/trip-1/invocations", json=_answer("v1:tool_call:nope"), headers=_key("x"))
        other = await http.post("/sessions/trip-2/invocations", json=PROMPT, headers=_key("other"))  # its own state
        calls = script.model_calls
        answered = await http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key("rome"))

    assert _problem(refused, 409, INTERRUPTS_PENDING)["pending"] == [interrupt]
    assert _problem(unknown, 409, INTERRUPT_STALE)["pending"] == [interrupt]
    assert other.json()["stop_reason"] == "interrupt" and calls == 2  # the refusals ran nothing
    assert answered.json()["stop_reason"] == "end_turn" and script.acted == 1


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: no interrupt check under the lock")
async def test_negative_control_without_the_check_a_prompt_while_pending_is_not_a_409(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn, "check_interrupts", lambda agent, prompt: None)
    await test_a_new_prompt_while_an_interrupt_is_pending_is_refused_with_it(tmp_path)


async def test_a_refused_answer_reused_with_another_body_is_a_key_mismatch_once_it_ran(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, Approvals())) as http:
        interrupt = await _ask(http)
        yes = await http.post("/sessions/trip-1/invocations", json=_answer(interrupt["id"]), headers=_key("yes"))
        no = await http.post(
            "/sessions/trip-1/invocations", json=_answer(interrupt["id"], {"approved": False}), headers=_key("yes")
        )
    assert yes.status_code == 200 and no.status_code == 422 and no.json()["type"] == KEY_MISMATCH


async def _stored_interrupted_turn(tmp_path: Path) -> tuple[dict[str, Any], httpx.Response, dict[str, Any]]:
    """An interrupted turn, then its POST retried and its status read once this server kept no run: from the store."""
    async with _client(_app(tmp_path, Approvals(), retain_finished_runs=0)) as http:
        interrupt = await _ask(http)
        replayed = await http.post("/sessions/trip-1/invocations", json=PROMPT, headers=_key("ask-1"))
        status = (await http.get("/invocations/ask-1")).json()
    return interrupt, replayed, status


async def test_a_stored_interrupted_result_replays_its_interrupts(tmp_path: Path) -> None:
    interrupt, replayed, status = await _stored_interrupted_turn(tmp_path)
    assert replayed.headers["Idempotent-Replayed"] == "true" and replayed.json()["interrupts"] == [interrupt]
    assert status["status"] == "completed" and status["result"]["interrupts"] == [interrupt]
    assert replayed.json()["text"] == ""  # the message's text (a tool call has none), not the interrupts' repr


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: the codec drops the interrupts")
async def test_negative_control_a_codec_without_interrupts_replays_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "_rebuild_interrupts", lambda stored: None)
    await test_a_stored_interrupted_result_replays_its_interrupts(tmp_path)


async def test_answers_belong_to_conversations(tmp_path: Path) -> None:
    async with _client(_app(tmp_path, Approvals())) as http:
        outside = await http.post("/invocations", json=_answer("v1:tool_call:x"), headers=_key("x"))
    assert _problem_400(outside)
    # Without session_manager=, an agent built per request has nothing pending: an answer is stale, nothing runs.
    script = Approvals()
    async with _client(_app(tmp_path, script, sessions=False)) as http:
        interrupt_id = (await http.post("/invocations", json=PROMPT, headers=_key("ask"))).json()["interrupts"][0]["id"]
        late = await http.post("/invocations", json=_answer(interrupt_id), headers=_key("yes"))
    assert _problem(late, 409, INTERRUPT_STALE)["pending"] == [] and script.acted == 0


def _problem_400(response: httpx.Response) -> bool:
    return response.status_code == 400 and response.json()["type"] == INVALID_BODY and "sessions" in response.text


def test_the_agent_failing_is_not_an_interrupt_problem() -> None:
    # The control of the mapping: an agent error stays a 500, whatever the conversation waits for.
    assert problem_for(TypeError("boom"), 1).type == AGENT_FAILED


async def test_a_session_manager_without_a_repository_shows_nothing_pending(tmp_path: Path) -> None:
    class Opaque:  # a session manager of another kind: its agent record cannot be read here
        session_id = "opaque"

    app = AgentApp(lambda request, **options: Agent(), single_tenant=True, session_manager=lambda sid, r: Opaque())
    async with _client(app) as http:
        state = (await http.get("/sessions/trip-1")).json()
    assert state["pending_interrupts"] == [] and state["updated_at"] is None
