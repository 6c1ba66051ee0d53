"""Cancelling a run from anywhere: a mark on its claim, seen by its owner at its next heartbeat.

"Hosts" share one in-memory store through wrappers of their own. The owner stops at its next cancellation point,
stores nothing, rolls its session turn back, and leaves a ``CANCELLED`` tombstone: a retry runs afresh (the journal
is not resumed: a cancelled run is not to be continued).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent, IdempotencyLeaseLostError, InvocationCancelledError
from strands_py._demo.storm import _until
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency._heartbeat import _Lease
from strands_py.idempotency.keys import make_key
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 20.0
# Long enough that a loaded machine (coverage tracing, other jobs) never stalls the event loop for a whole lease: a run
# that loses its lease is not what these tests are about; short enough that a dead owner's claim lapses soon.
LEASE = 6.0
# A turn that must run on while others are cancelled: no stall of any length ends its lease within the test.
HOLDER_LEASE = 600.0
# A cancelled turn waiting for its session learns of it at its next heartbeat (LEASE / 3) and stops waiting.
STOPS_WAITING_WITHIN = 15.0

pytestmark = pytest.mark.racing  # the owner runs on a model thread while another host cancels it


class _GatedAnswer(ScriptedBedrock):
    """The turn's second model call (the answer, after the tool) waits at a gate, or until its agent is cancelled.

    A model call blocked in its thread cannot be interrupted: strands-agents 1.30 stops a cancelled run only when the
    call returns. The answer comes as soon as the agent's ``cancel()`` was called, so the run meets its next
    cancellation point on every strands release, after the cancel (the answer arrives too late to count).
    """

    def __init__(self) -> None:
        super().__init__()
        self.answering = threading.Event()
        self.release = threading.Event()
        self.cancelled = threading.Event()

    def watch(self, agent: Agent) -> Agent:
        cancel = agent.cancel

        def cancelled() -> None:
            self.cancelled.set()
            cancel()

        agent.cancel = cancelled  # type: ignore[method-assign]
        return agent

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        if any("toolResult" in block for block in request["messages"][-1]["content"]):
            self.answering.set()
            deadline = time.monotonic() + WAIT
            while not (self.release.wait(0.01) or self.cancelled.is_set()) and time.monotonic() < deadline:
                pass
        return super().converse_stream(**request)


class _Hosts:
    def __init__(self, tmp_path: Path) -> None:
        self.inner = InMemoryIdempotencyStore()
        self.config = IdempotencyConfig(store=self.inner, scope="s", lease_seconds=LEASE)
        self.dir = str(tmp_path / "sessions")

    def agent(self, script: ScriptedBedrock, *, session: bool = False, lease: float | None = None) -> Agent:
        extra: dict[str, Any] = {}
        if session:
            extra["session_manager"] = FileSessionManager(session_id="conv-1", storage_dir=self.dir)
        config = dataclasses.replace(self.config, store=CountingStore(self.inner))
        if lease is not None:
            config = dataclasses.replace(config, lease_seconds=lease)
        agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=config, **extra)
        return script.watch(agent) if isinstance(script, _GatedAnswer) else agent

    def prompts(self) -> list[str]:
        manager = FileSessionManager(session_id="conv-1", storage_dir=self.dir)
        messages = [m.to_message() for m in manager.list_messages("conv-1", "default")]
        return [m["content"][0]["text"] for m in messages if m["role"] == "user" and "text" in m["content"][0]]


async def _cancel_a_running_turn(hosts: _Hosts, *, session: bool) -> tuple[BaseException | None, ScriptedBedrock]:
    """Host A runs the turn to its answer's model call; host B marks it cancelled; A's answer then arrives late.

    Returns what A's caller got, and the script of a retry on a third host.
    """
    if session:
        await asyncio.wait_for(hosts.agent(ScriptedBedrock(), session=True).invoke_async("t0?"), WAIT)
    script = _GatedAnswer()
    running = asyncio.create_task(hosts.agent(script, session=session).invoke_async("t1?", idempotency_token="t1"))
    await _until(script.answering.is_set, WAIT, "the answer's model call")
    marked = await hosts.inner.cancel(make_key("s", "t1"))
    assert marked is not None and marked.cancelled
    # A's heartbeat learns of it, and its run stops; the answer it was waiting for comes too late to count.
    outcome: BaseException | None = None
    try:
        await asyncio.wait_for(running, WAIT)
    except BaseException as e:  # noqa: BLE001 - what the caller got is the point
        outcome = e
    finally:
        script.release.set()
    retry = ScriptedBedrock()
    await asyncio.wait_for(hosts.agent(retry, session=session).invoke_async("t1?", idempotency_token="t1"), WAIT)
    return outcome, retry


@pytest.mark.parametrize("session", [False, True], ids=["token", "session-turn"])
async def test_a_cancelled_run_stops_stores_nothing_and_its_retry_runs_afresh(tmp_path: Path, session: bool) -> None:
    hosts = _Hosts(tmp_path)
    outcome, retry = await _cancel_a_running_turn(hosts, session=session)
    assert isinstance(outcome, InvocationCancelledError), outcome
    # a fresh run: every step paid again (the cancelled run's journal is not resumed)
    assert (retry.model_calls, retry.tool_calls) == (2, 1)
    if session:
        assert hosts.prompts() == ["t0?", "t1?"], "the cancelled turn was not rolled back"


async def test_a_cancelled_run_leaves_a_tombstone_until_a_retry(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    script = _GatedAnswer()
    running = asyncio.create_task(hosts.agent(script).invoke_async("t1?", idempotency_token="t1"))
    await _until(script.answering.is_set, WAIT, "the answer's model call")
    await hosts.inner.cancel(make_key("s", "t1"))
    with pytest.raises(InvocationCancelledError):
        await asyncio.wait_for(running, WAIT)
    script.release.set()
    tombstone = await hosts.inner.get(make_key("s", "t1"))
    assert tombstone is not None and tombstone.state is RecordState.CANCELLED
    assert await hosts.inner.cancel(make_key("s", "t1")) == tombstone  # cancelling again changes nothing


async def test_a_marked_claim_whose_owner_died_is_ended_by_the_retry_and_run_afresh(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    script = _GatedAnswer()

    async def silent(self: _Lease) -> None:
        return None

    with mock.patch.object(_Lease, "_renew_forever", silent):  # host A dies in its answer's model call
        running = asyncio.create_task(hosts.agent(script).invoke_async("t1?", idempotency_token="t1"))
        await _until(script.answering.is_set, WAIT, "the answer's model call")
    try:
        await hosts.inner.cancel(make_key("s", "t1"))
        retry = ScriptedBedrock()
        result = await asyncio.wait_for(hosts.agent(retry).invoke_async("t1?", idempotency_token="t1"), WAIT)
        assert result.stop_reason == "end_turn" and (retry.model_calls, retry.tool_calls) == (2, 1)
    finally:
        script.release.set()
        await asyncio.wait([running], timeout=WAIT)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a cancel read as a lost lease")
async def test_negative_control_a_cancel_read_as_a_lost_lease_resumes_the_cancelled_run(tmp_path: Path) -> None:
    async def taken_over(self: _Lease) -> None:
        self._lose("the renewal was fenced off")

    with mock.patch.object(_Lease, "_fenced_off", taken_over):
        await test_a_cancelled_run_stops_stores_nothing_and_its_retry_runs_afresh(tmp_path, False)


async def test_cancel_invocation_stops_the_agents_own_run_at_once_and_leaves_finished_ones(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    hosts.config = dataclasses.replace(hosts.config, lease_seconds=30.0)  # no heartbeat comes: only cancel() stops it
    script = _GatedAnswer()
    agent = hosts.agent(script)
    running = asyncio.create_task(agent.invoke_async("t1?", idempotency_token="t1"))
    await _until(script.answering.is_set, WAIT, "the answer's model call")
    assert await agent.cancel_invocation("t1") is RecordState.IN_PROGRESS
    script.release.set()
    with pytest.raises(InvocationCancelledError):  # stopped by cancel() at its next cancellation point
        await asyncio.wait_for(running, WAIT)
    assert await agent.cancel_invocation("t1") is RecordState.CANCELLED
    other = hosts.agent(ScriptedBedrock())
    await asyncio.wait_for(other.invoke_async("t2?", idempotency_token="t2"), WAIT)
    assert await other.cancel_invocation("t2") is RecordState.COMPLETED  # its answer stands
    assert await other.cancel_invocation("never") is None
    with pytest.raises(ValueError, match="idempotency configuration"):
        await Agent(model=ScriptedBedrock().model(), callback_handler=None).cancel_invocation("t1")


class _CancelAtComplete(CountingStore):
    """A cancel lands right as the run stores its answer (between its last heartbeat and its complete)."""

    async def complete(self, record: Any) -> bool:
        if record.state is RecordState.COMPLETED:
            await self.inner.cancel(record.key)
        return await super().complete(record)


async def test_a_cancel_that_lands_as_the_answer_is_stored_wins(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    agent = hosts.agent(ScriptedBedrock())
    agent.idempotency = dataclasses.replace(hosts.config, store=_CancelAtComplete(hosts.inner))
    with pytest.raises(InvocationCancelledError):
        await asyncio.wait_for(agent.invoke_async("t1?", idempotency_token="t1"), WAIT)
    left = await hosts.inner.get(make_key("s", "t1"))
    assert left is not None and left.state is RecordState.CANCELLED  # a tombstone, not a marked claim left behind


async def test_a_turn_waiting_for_its_session_stops_waiting_when_it_is_cancelled(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    hosts.config = dataclasses.replace(hosts.config, session_invocation_mode="enqueue")
    holder = _GatedAnswer()
    holding = hosts.agent(holder, session=True, lease=HOLDER_LEASE)
    running = asyncio.create_task(holding.invoke_async("t1?", idempotency_token="t1"))
    await _until(holder.answering.is_set, WAIT, "the first turn's answer")
    try:
        waiting = asyncio.create_task(hosts.agent(ScriptedBedrock(), session=True).invoke_async("t2?"))
        third = hosts.agent(ScriptedBedrock(), session=True)
        counting = third.idempotency.store if third.idempotency is not None else None
        assert isinstance(counting, CountingStore)
        queued = asyncio.create_task(third.invoke_async("t3?", idempotency_token="t3"))
        await _until(lambda: counting.calls["claim"] >= 1, WAIT, "t3's claim")  # then it waits for the session
        await hosts.inner.cancel(make_key("s", "t3"))
        with pytest.raises(InvocationCancelledError):
            # well before the first turn ends (it waits for the test): it stopped waiting for the session
            await asyncio.wait_for(queued, STOPS_WAITING_WITHIN)
        assert not running.done()
    finally:
        holder.release.set()
    await asyncio.wait_for(asyncio.gather(running, waiting), WAIT)


@pytest.mark.xfail(raises=IdempotencyLeaseLostError, strict=True, reason="negative control: a cancel lost at complete")
async def test_negative_control_a_cancel_at_complete_read_as_a_lost_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strands_py.turn import _settle

    real = _settle._complete

    async def no_cancel_check(call: Any, result: Any, *, margin: int) -> Any:
        try:
            return await real(call, result, margin=margin)
        except InvocationCancelledError as e:
            raise IdempotencyLeaseLostError(call.key, "taken over") from e

    monkeypatch.setattr(_settle, "_complete", no_cancel_check)
    await test_a_cancel_that_lands_as_the_answer_is_stored_wins(tmp_path)


# asyncio.TimeoutError: on Python 3.10 wait_for's timeout is not the builtin TimeoutError (one class from 3.11).
@pytest.mark.xfail(
    raises=asyncio.TimeoutError, strict=True, reason="negative control: a cancelled turn waits for its session"
)
async def test_negative_control_a_cancelled_turn_waits_for_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strands_py.session._turn import SessionTurn

    real = SessionTurn.begin

    async def without_stop(self: SessionTurn, token_key: Any, writable: Any = None, stop: Any = None) -> None:
        await real(self, token_key, writable, None)

    monkeypatch.setattr(SessionTurn, "begin", without_stop)
    await test_a_turn_waiting_for_its_session_stops_waiting_when_it_is_cancelled(tmp_path)
