"""Humans in the loop through the Python API: an answer is bound to the interrupts its conversation waits for.

An agent that stopped for a human (``stop_reason="interrupt"``) is answered by a call whose prompt holds
``interruptResponse`` blocks. Under the session lock, once the conversation is read again, the answer must name
interrupts pending *now*: an interrupt answered already (by another Agent instance, another process), rolled back
or superseded is refused with ``InterruptResponseStaleError``, a new prompt while interrupts are pending with
``InterruptsPendingError``; nothing of the refused call runs or is written, and its token is free again. The answer
already given replays for its own token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import strands
from strands import ToolContext, tool
from strands.session.file_session_manager import FileSessionManager

from strands_py import (
    Agent,
    IdempotencyKeyMismatchError,
    IdempotencyStoreError,
    InterruptResponseStaleError,
    InterruptsPendingError,
    InterruptStateError,
    ReplayedAgentResult,
    SessionBusyError,
)
from strands_py.agent import _gate
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.idempotency.record import IdempotencyRecord
from strands_py.session import _interrupts, _turn
from strands_py.session._interrupts import answered_ids, check_interrupts, pending_in_record, pending_interrupts
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 20.0
APPROVED = {"approved": True}


class Approvals(ScriptedBedrock):
    """The script's tool asks a human before it acts; ``acted`` counts what it did after the approval.

    ``confirm``: after the approval (counted in ``approved``), the tool asks a second time (``confirm``), then acts.
    """

    def __init__(self, *, confirm: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.confirm = confirm
        self.approved = 0
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
            if not answer.get("approved"):
                return "not approved"
            if script.confirm:
                with script._count:
                    script.approved += 1  # a side effect between two questions: runs again on every resume
                tool_context.interrupt("confirm", reason="sure?")
            with script._count:
                script.acted += 1
            return f"{city}: sunny"

        return [lookup_weather]


def answer(interrupt: Any, response: Any = APPROVED) -> list[dict[str, Any]]:
    interrupt_id = interrupt if isinstance(interrupt, str) else interrupt.id
    return [{"interruptResponse": {"interruptId": interrupt_id, "response": response}}]


class _Conversation:
    """Agents of one conversation (a FileSessionManager directory) sharing one store: other instances, or processes."""

    def __init__(self, tmp_path: Path, store: Any = None, **config: Any) -> None:
        self.dir = str(tmp_path / "sessions")
        config = {"lease_seconds": 2.0, **config}
        self.config = IdempotencyConfig(store=store or InMemoryIdempotencyStore(), **config)

    def agent(self, script: ScriptedBedrock, *, process: bool = False, session: str = "conv-1") -> Agent:
        """A new Agent instance; ``process``: as another process would build it (no in-process sharing)."""
        config = dataclasses.replace(self.config, store=CountingStore(self.config.store)) if process else self.config
        manager = FileSessionManager(session_id=session, storage_dir=self.dir)
        return Agent(
            model=script.model(),
            tools=script.tools(),
            callback_handler=None,
            session_manager=manager,
            idempotency=config,
        )

    def messages(self, session: str = "conv-1") -> list[Any]:
        manager = FileSessionManager(session_id=session, storage_dir=self.dir)
        return manager.list_messages(session, "default")

    def record(self, session: str = "conv-1") -> Any:
        manager = FileSessionManager(session_id=session, storage_dir=self.dir)
        return manager.read_agent(session, "default")


async def _call(agent: Agent, prompt: Any, token: str | None) -> Any:
    return await asyncio.wait_for(agent.invoke_async(prompt, idempotency_token=token), WAIT)


# -- the flow ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answered_by", ["the same instance", "another instance", "another process"])
async def test_an_interrupted_turn_is_answered_once_and_its_answer_replays(tmp_path: Path, answered_by: str) -> None:
    conversation, script = _Conversation(tmp_path), Approvals()
    asker = conversation.agent(script)
    asked = await _call(asker, "Weather in Paris?", "t1")
    assert asked.stop_reason == "interrupt" and [i.name for i in asked.interrupts] == ["approval"]
    assert asked.interrupts[0].reason == {"city": "Paris"} and script.acted == 0
    # Another reader of the persisted conversation sees what it waits for.
    assert [i.id for i in pending_in_record(conversation.record()._internal_state)] == [asked.interrupts[0].id]

    responder = {
        "the same instance": asker,
        "another instance": conversation.agent(script),
        "another process": conversation.agent(script, process=True),
    }[answered_by]
    done = await _call(responder, answer(asked.interrupts[0]), "t2")
    again = await _call(conversation.agent(script, process=True), answer(asked.interrupts[0]), "t2")

    assert done.stop_reason == "end_turn" and script.acted == 1  # the tool acted once, after the approval
    assert isinstance(again, ReplayedAgentResult) and str(again) == str(done) and script.acted == 1
    assert pending_in_record(conversation.record()._internal_state) == []


async def test_an_interrupt_answered_again_with_a_new_token_is_stale_and_the_token_stays_free(tmp_path: Path) -> None:
    conversation, script = _Conversation(tmp_path), Approvals()
    asker = conversation.agent(script)  # long-lived: its own memory still shows the interrupt pending afterwards
    asked = await _call(asker, "Weather in Paris?", "t1")
    await _call(conversation.agent(script), answer(asked.interrupts[0]), "t2")
    assert pending_interrupts(asker) != []  # stale memory: the conversation was answered elsewhere
    written = len(conversation.messages())

    with pytest.raises(InterruptResponseStaleError) as refused:
        await _call(asker, answer(asked.interrupts[0], {"approved": False}), "t3")

    assert refused.value.pending == [] and refused.value.stale == [asked.interrupts[0].id]
    assert isinstance(refused.value, InterruptStateError) and script.acted == 1
    assert len(conversation.messages()) == written  # nothing of the refused call was written
    # Not sticky: the same token, now with a request that fits the conversation, runs.
    next_turn = await _call(asker, "And in Rome?", "t3")
    assert next_turn.stop_reason == "interrupt" and script.acted == 1


@pytest.mark.xfail(raises=IdempotencyKeyMismatchError, strict=True, reason="negative control: the claim is yielded")
async def test_negative_control_a_refused_call_that_yields_its_claim_makes_its_token_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal goes unnoticed: the claim is yielded (its journal kept) as for any run that ended without a result.
    monkeypatch.setattr(_gate._Refusal, "refused", lambda self, error: False)
    await test_an_interrupt_answered_again_with_a_new_token_is_stale_and_the_token_stays_free(tmp_path)


async def test_a_new_prompt_while_interrupts_are_pending_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    conversation, script = _Conversation(tmp_path), Approvals()
    asked = await _call(conversation.agent(script), "Weather in Paris?", "t1")
    written, record = len(conversation.messages()), conversation.record()

    for prompt in ("And in Rome?", None, [{"text": "And in Rome?"}]):
        with pytest.raises(InterruptsPendingError) as refused:
            await _call(conversation.agent(script, process=True), prompt, "t2")
        assert [i.id for i in refused.value.pending] == [asked.interrupts[0].id]

    assert len(conversation.messages()) == written and conversation.record().updated_at == record.updated_at
    assert script.model_calls == 1  # nothing ran
    done = await _call(conversation.agent(script), answer(asked.interrupts[0]), "t2")  # t2 is free again
    assert done.stop_reason == "end_turn" and script.acted == 1


async def _answer_superseded(tmp_path: Path) -> tuple[Approvals, Any, Any]:
    """Approval answered (the tool then asks to confirm), then the approval answered again: the script, the
    confirmation interrupt, and what the second answer came to (its result, or what it raised)."""
    conversation, script = _Conversation(tmp_path), Approvals(confirm=True)
    asked = await _call(conversation.agent(script), "Weather in Paris?", "t1")
    approval = asked.interrupts[0]
    confirm = (await _call(conversation.agent(script), answer(approval), "t2")).interrupts[0]
    assert confirm.name == "confirm" and script.approved == 1
    try:
        outcome = await _call(conversation.agent(script), answer(approval), "t3")
    except InterruptStateError as e:
        outcome = e
    return script, confirm, outcome


async def test_an_answer_to_a_superseded_interrupt_is_stale_and_names_the_one_pending(tmp_path: Path) -> None:
    script, confirm, outcome = await _answer_superseded(tmp_path)
    assert script.approved == 1  # the stale answer did not resume the tool
    assert isinstance(outcome, InterruptResponseStaleError) and [i.id for i in outcome.pending] == [confirm.id]


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: no interrupt check")
async def test_negative_control_without_the_check_a_superseded_answer_resumes_the_wrong_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn, "check_interrupts", lambda agent, prompt: None)
    script, _, _ = await _answer_superseded(tmp_path)
    assert script.approved == 1  # strands resumed the stale approval: the tool's first step ran again


class _FailsOnce(InMemoryIdempotencyStore):
    """A store whose first result write fails; just before it, what another reader would see is noted."""

    def __init__(self, seen: Any) -> None:
        super().__init__()
        self.failures = 1
        self.seen = seen
        self.pending_seen: list[Any] = []

    async def complete(self, record: IdempotencyRecord) -> bool:
        if self.failures:
            self.failures -= 1
            self.pending_seen = self.seen()
            raise OSError("the store went away while the answer was written")
        return await super().complete(record)


async def test_an_answer_to_an_interrupt_whose_turn_was_rolled_back_is_stale(tmp_path: Path) -> None:
    conversation = _Conversation(tmp_path)
    store = _FailsOnce(lambda: pending_in_record(conversation.record()._internal_state))
    conversation.config = dataclasses.replace(conversation.config, store=store)
    script = Approvals()

    with pytest.raises(IdempotencyStoreError):  # the answer could not be kept: the turn is rolled back
        await _call(conversation.agent(script), "Weather in Paris?", "t1")
    assert [i.name for i in store.pending_seen] == ["approval"]  # a reader saw it while the turn ran
    assert conversation.messages() == []

    with pytest.raises(InterruptResponseStaleError) as refused:
        await _call(conversation.agent(script, process=True), answer(store.pending_seen[0]), "t2")
    assert refused.value.pending == [] and script.acted == 0


async def test_an_agent_without_a_session_checks_its_own_interrupts(tmp_path: Path) -> None:
    script = Approvals()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=IdempotencyConfig())
    asked = await _call(agent, "Weather in Paris?", "t1")
    with pytest.raises(InterruptsPendingError):
        await _call(agent, "And in Rome?", "t2")
    with pytest.raises(InterruptResponseStaleError) as refused:
        await _call(agent, answer("v1:tool_call:unknown"), "t2")
    assert [i.id for i in refused.value.pending] == [asked.interrupts[0].id] and script.model_calls == 1
    done = await _call(agent, answer(asked.interrupts[0]), "t2")  # the token refused twice runs once it fits
    assert done.stop_reason == "end_turn" and script.acted == 1
    with pytest.raises(InterruptResponseStaleError):
        await _call(agent, answer(asked.interrupts[0]), "t3")
    assert isinstance(await _call(agent, answer(asked.interrupts[0]), "t2"), ReplayedAgentResult)


async def test_a_locked_turn_without_a_token_is_checked_and_releases_the_session(tmp_path: Path) -> None:
    conversation, script = _Conversation(tmp_path), Approvals()
    asked = await _call(conversation.agent(script), "Weather in Paris?", None)
    with pytest.raises(InterruptsPendingError):
        await _call(conversation.agent(script), "And in Rome?", None)
    done = await _call(conversation.agent(script), answer(asked.interrupts[0]), None)  # the session was released
    assert done.stop_reason == "end_turn" and script.acted == 1


@pytest.mark.parametrize("in_session", [False, True], ids=["agent", "session"])
async def test_an_interrupt_error_the_check_did_not_raise_keeps_the_claim_for_its_retry(
    tmp_path: Path, in_session: bool
) -> None:
    # Raised by the run itself (here its model), not by the check: the run failed like any other, and its claim is
    # yielded with its journal for the retry of the same request, never released as a refusal.
    conversation, script = _Conversation(tmp_path), ScriptedBedrock(fail_with=InterruptsPendingError([]))
    agent = (
        conversation.agent(script)
        if in_session
        else Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=conversation.config)
    )
    with pytest.raises(InterruptsPendingError):
        await _call(agent, "Weather in Paris?", "t1")
    script.fail_with = None
    with pytest.raises(IdempotencyKeyMismatchError):  # a released claim would have let another request run
        await _call(agent, "And in Rome?", "t1")
    done = await _call(agent, "Weather in Paris?", "t1")  # the retry of the same request runs
    assert done.stop_reason == "end_turn" and script.model_calls == 3


async def test_agents_without_idempotency_behave_as_upstream(tmp_path: Path) -> None:
    script = Approvals()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    await _call(agent, "Weather in Paris?", None)
    with pytest.raises(TypeError):  # strands' own refusal of a prompt while interrupts are pending
        await _call(agent, "And in Rome?", None)


# -- races ---------------------------------------------------------------------------------------------------------


@pytest.mark.racing
@pytest.mark.parametrize("mode", ["throw", "enqueue"])
async def test_two_answers_racing_for_one_interrupt_resume_it_once(tmp_path: Path, mode: str) -> None:
    # A lease as long as the test's own waits: no takeover is meant here, and a 2 s lease was lost once in CI (two
    # compat legs on two cores) when the first answer's heartbeat could not run for 1.3 s while it held the session.
    conversation = _Conversation(tmp_path, session_invocation_mode=mode, wait_timeout_seconds=WAIT, lease_seconds=WAIT)
    script = Approvals()
    asked = await _call(conversation.agent(script), "Weather in Paris?", "t1")
    # The first answer holds its model call (after its tool acted) while holding the session; the second races it.
    script.gate, script.gate_timeout = threading.Event(), WAIT
    script.entered.clear()
    first = asyncio.ensure_future(_call(conversation.agent(script, process=True), answer(asked.interrupts[0]), "a"))
    await asyncio.wait_for(asyncio.to_thread(script.entered.wait, WAIT), WAIT)
    second = asyncio.ensure_future(_call(conversation.agent(script, process=True), answer(asked.interrupts[0]), "b"))
    if mode == "throw":
        await asyncio.wait([second], timeout=WAIT)  # refused at once, while the first holds the session
    script.gate.set()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)

    assert getattr(outcomes[0], "stop_reason", outcomes[0]) == "end_turn"
    expected = SessionBusyError if mode == "throw" else InterruptResponseStaleError
    assert isinstance(outcomes[1], expected), outcomes[1]
    assert script.acted == 1


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: upstream agents re-read nothing")
async def test_negative_control_upstream_agents_answering_one_interrupt_both_resume_it(tmp_path: Path) -> None:
    directory, script = str(tmp_path / "sessions"), Approvals()

    def upstream() -> strands.Agent:
        manager = FileSessionManager(session_id="conv-1", storage_dir=directory)
        return strands.Agent(model=script.model(), tools=script.tools(), callback_handler=None, session_manager=manager)

    asked = await asyncio.wait_for(upstream().invoke_async("Weather in Paris?"), WAIT)
    one, two = upstream(), upstream()  # two servers' agents, built while the interrupt is pending
    await asyncio.wait_for(one.invoke_async(answer(asked.interrupts[0])), WAIT)
    await asyncio.wait_for(two.invoke_async(answer(asked.interrupts[0])), WAIT)
    assert script.acted == 1  # upstream: the second answer resumed the answered interrupt, the tool acted again


# -- the check's parts ---------------------------------------------------------------------------------------------


def test_answers_are_lists_of_interrupt_response_blocks_only() -> None:
    assert answered_ids(answer("a") + answer("b")) == ["a", "b"]
    for prompt in (None, "text", [], [{"text": "hi"}], answer("a") + [{"text": "hi"}], [{"interruptResponse": 1}]):
        assert answered_ids(prompt) is None, prompt
    assert answered_ids([{"interruptResponse": {"interruptId": 7}}]) == ["7"]  # never pending: stale


def test_a_mix_of_answers_and_content_is_left_to_strands() -> None:
    class Waiting:
        _interrupt_state = strands.interrupt._InterruptState(
            interrupts={"a": strands.interrupt.Interrupt("a", "approval")}, activated=True
        )

    check_interrupts(Waiting(), answer("a") + [{"text": "hi"}])  # strands refuses it with its own TypeError
    check_interrupts(Waiting(), answer("a"))
    with pytest.raises(InterruptsPendingError):
        check_interrupts(Waiting(), "hi")
    check_interrupts(object(), "hi")  # an agent without interrupt state waits for nothing


@pytest.mark.parametrize(
    "internal_state",
    [
        None,
        {},
        {"interrupt_state": []},
        {"interrupt_state": {"activated": False, "interrupts": {"a": {"id": "a", "name": "n"}}}},
        {"interrupt_state": {"activated": True, "interrupts": []}},
        {"interrupt_state": {"activated": True, "interrupts": {"a": {"id": "a", "name": "n", "response": 1}}}},
        {"interrupt_state": {"activated": True, "interrupts": {"a": {"id": 1, "name": "n"}, "b": "x"}}},
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_record_waiting_for_nothing_reads_as_nothing_pending(internal_state: Any) -> None:
    assert pending_in_record(internal_state) == []


def test_a_record_of_another_strands_version_keeps_the_fields_this_one_knows() -> None:
    item = {"id": "a", "name": "approval", "reason": {"city": "Paris"}, "response": None, "added_later": 1}
    pending = pending_in_record({"interrupt_state": {"activated": True, "interrupts": {"a": item}}})
    assert [(i.id, i.name, i.reason) for i in pending] == [("a", "approval", {"city": "Paris"})]


def test_the_check_the_negative_controls_replace_is_the_one_the_turn_and_the_gate_call() -> None:
    assert _turn.check_interrupts is _interrupts.check_interrupts is _gate.check_interrupts
