"""Session turns in one process: the lock, enqueue or reject, re-reading under the lock, rollback of dead turns.

The multi-process versions (SIGKILL inside a tool, File and S3 session managers) live in integ_tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from session_kit import ONE_TURN, BlockingTool, no_heartbeats, shape
from strands.session.file_session_manager import FileSessionManager

from strands_py import (
    Agent,
    ConcurrencyException,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    SessionBusyError,
)
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.keys import make_key, session_lock_key
from strands_py.idempotency.record import new_version
from strands_py.session import _lock
from strands_py.session._conversation import _Conversation
from strands_py.session._turn import SessionTurn
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 20.0
pytestmark = pytest.mark.racing
# Live owners hold long leases: agents built on the test's loop while an owner runs block that loop (each build
# parses botocore's models: up to a second on a loaded machine), and a short lease would lapse meanwhile. Only an
# owner meant to die holds a short one, which is how long the next owner waits for it.
LEASE = 6.0
DEAD_LEASE = 2.0


class _Env:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.dir = str(tmp_path / "sessions")
        config.setdefault("lease_seconds", LEASE)
        self.config = IdempotencyConfig(store=InMemoryIdempotencyStore(), **config)

    def agent(self, script: ScriptedBedrock, session: str = "conv-1", *, process: str | None = None) -> Agent:
        """An agent of this process, or (``process=``) of another one: same records, no in-process sharing."""
        config = self.config
        if process is not None:
            config = dataclasses.replace(config, store=CountingStore(config.store))
        return Agent(
            model=script.model(),
            tools=script.tools(),
            callback_handler=None,
            session_manager=FileSessionManager(session_id=session, storage_dir=self.dir),
            idempotency=config,
        )

    def persisted(self, session: str = "conv-1") -> list[Any]:
        manager = FileSessionManager(session_id=session, storage_dir=self.dir)
        return [m.to_message() for m in manager.list_messages(session, "default")]


def _gated() -> tuple[threading.Event, ScriptedBedrock]:
    gate = threading.Event()
    return gate, ScriptedBedrock(gate=gate, gate_timeout=WAIT)


async def test_an_agent_built_before_the_lock_re_reads_the_conversation_under_it(tmp_path: Path) -> None:
    env = _Env(tmp_path)
    first, second = env.agent(ScriptedBedrock()), env.agent(ScriptedBedrock())  # both restore an empty conversation
    await asyncio.wait_for(first.invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
    await asyncio.wait_for(second.invoke_async("weather in Rome?", idempotency_token="t2"), WAIT)
    assert shape(env.persisted()) == ONE_TURN * 2
    assert env.persisted()[4]["content"][0]["text"] == "weather in Rome?"
    assert shape(second.messages) == ONE_TURN * 2


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_re_reading_the_second_turn_overwrites_the_first(tmp_path: Path) -> None:
    with mock.patch.object(_Conversation, "reload", lambda self: None):
        await test_an_agent_built_before_the_lock_re_reads_the_conversation_under_it(tmp_path)


async def test_throw_mode_rejects_another_request_for_a_busy_session(tmp_path: Path) -> None:
    env = _Env(tmp_path)
    gate, script = _gated()
    running = asyncio.create_task(env.agent(script).invoke_async("weather in Paris?", idempotency_token="t1"))
    await _until(script.entered.is_set, WAIT, "the first turn's model call")
    with pytest.raises(SessionBusyError) as raised:
        await asyncio.wait_for(
            env.agent(ScriptedBedrock()).invoke_async("weather in Rome?", idempotency_token="t2"), WAIT
        )
    assert isinstance(raised.value, ConcurrencyException)
    gate.set()
    await asyncio.wait_for(running, WAIT)
    assert shape(env.persisted()) == ONE_TURN


async def test_enqueue_mode_runs_both_turns_one_after_the_other(tmp_path: Path) -> None:
    env = _Env(tmp_path, session_invocation_mode="enqueue")
    gate, script = _gated()
    running = asyncio.create_task(env.agent(script).invoke_async("weather in Paris?", idempotency_token="t1"))
    await _until(script.entered.is_set, WAIT, "the first turn's model call")
    queued_script = ScriptedBedrock()
    queued = asyncio.create_task(env.agent(queued_script).invoke_async("weather in Rome?", idempotency_token="t2"))
    await asyncio.sleep(0)  # let it queue; it must not run while the first turn holds the session
    assert queued_script.model_calls == 0 and not queued.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(running, queued), WAIT)
    persisted = env.persisted()
    assert shape(persisted) == ONE_TURN * 2
    assert [persisted[0]["content"][0]["text"], persisted[4]["content"][0]["text"]] == [
        "weather in Paris?",
        "weather in Rome?",
    ]


async def test_enqueue_mode_gives_up_after_the_wait_timeout(tmp_path: Path) -> None:
    env = _Env(tmp_path, session_invocation_mode="enqueue", wait_timeout_seconds=0.2)
    gate, script = _gated()
    running = asyncio.create_task(env.agent(script).invoke_async("weather in Paris?", idempotency_token="t1"))
    await _until(script.entered.is_set, WAIT, "the first turn's model call")
    with pytest.raises(SessionBusyError, match="waited"):
        await asyncio.wait_for(
            env.agent(ScriptedBedrock()).invoke_async("weather in Rome?", idempotency_token="t2"), WAIT
        )
    gate.set()
    await asyncio.wait_for(running, WAIT)


async def test_a_retry_of_the_same_request_joins_and_never_queues(tmp_path: Path) -> None:
    env = _Env(tmp_path)  # throw mode: a queued retry would be rejected
    gate, script = _gated()
    first = env.agent(script)
    running = asyncio.create_task(first.invoke_async("weather in Paris?", idempotency_token="t1"))
    await _until(script.entered.is_set, WAIT, "the first turn's model call")
    retry = asyncio.create_task(env.agent(ScriptedBedrock()).invoke_async("weather in Paris?", idempotency_token="t1"))
    inflight = first._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the retry to join")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(running, retry), WAIT)
    assert results[0] is results[1]
    later = await asyncio.wait_for(
        env.agent(ScriptedBedrock()).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
    )
    assert isinstance(later, ReplayedAgentResult)
    assert shape(env.persisted()) == ONE_TURN


async def test_a_failed_turn_is_rolled_back_and_its_retry_is_one_clean_turn(tmp_path: Path) -> None:
    env = _Env(tmp_path)
    await asyncio.wait_for(env.agent(ScriptedBedrock()).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
    failing = _FailAfterTool()
    with pytest.raises(Exception, match="model down"):
        await asyncio.wait_for(env.agent(failing).invoke_async("weather in Rome?", idempotency_token="t2"), WAIT)
    assert failing.tool_calls == 1
    assert shape(env.persisted()) == ONE_TURN  # the failed turn left nothing
    await asyncio.wait_for(env.agent(ScriptedBedrock()).invoke_async("weather in Rome?", idempotency_token="t2"), WAIT)
    assert shape(env.persisted()) == ONE_TURN * 2


class _FailAfterTool(ScriptedBedrock):
    def converse_stream(self, **request: Any) -> dict[str, Any]:
        messages = request.get("messages", [])
        if messages and any("toolResult" in b for b in messages[-1].get("content", [])):
            self.model_calls += 1
            raise RuntimeError("model down")
        return super().converse_stream(**request)


async def test_a_dead_turn_is_rolled_back_by_the_retry_and_the_dead_owner_writes_nothing(tmp_path: Path) -> None:
    env = _Env(tmp_path, lease_seconds=DEAD_LEASE)
    await asyncio.wait_for(env.agent(ScriptedBedrock()).invoke_async("hello", idempotency_token="t0"), WAIT)
    dead_script = BlockingTool(WAIT, must_open=True)
    with no_heartbeats():
        dead = asyncio.create_task(env.agent(dead_script).invoke_async("weather in Rome?", idempotency_token="t1"))
        await _until(dead_script.tool_entered.is_set, WAIT, "the doomed turn's tool")
    try:
        # persisted so far: the first turn, then the doomed turn's prompt and tool request
        assert shape(env.persisted()) == ONE_TURN + ONE_TURN[:2]
        retry_script = ScriptedBedrock()
        result = await asyncio.wait_for(
            env.agent(retry_script, process="other").invoke_async("weather in Rome?", idempotency_token="t1"),
            WAIT + DEAD_LEASE,
        )
        assert result.stop_reason == "end_turn" and retry_script.model_calls == 2
        assert shape(env.persisted()) == ONE_TURN * 2  # exactly one uninterrupted turn, the prompt once
        # the dead owner wakes up: its tool result must not reach the conversation
        dead_script.tool_gate.set()
        with pytest.raises(IdempotencyLeaseLostError):
            await asyncio.wait_for(dead, WAIT)
        assert shape(env.persisted()) == ONE_TURN * 2
        assert env.persisted()[4]["content"][0]["text"] == "weather in Rome?"
    finally:
        dead_script.tool_gate.set()  # never leave the blocked tool thread behind
        await asyncio.wait([dead], timeout=WAIT)


async def test_a_turn_whose_result_was_stored_is_kept_when_its_owner_died_before_unlocking(tmp_path: Path) -> None:
    # The next turn waits for the dead lock's lease.
    env = _Env(tmp_path, session_invocation_mode="enqueue", lease_seconds=DEAD_LEASE)

    async def commit_without_unlocking(self: SessionTurn) -> None:
        assert self.lease is not None
        await self.lease.stop()
        self._held = False
        self._unfence_writes()
        self.lock.abandon()  # died right after storing the result: the lock record stays until its lease lapses

    with mock.patch.object(SessionTurn, "commit", commit_without_unlocking):
        await asyncio.wait_for(
            env.agent(ScriptedBedrock()).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
        )
    await asyncio.wait_for(
        env.agent(ScriptedBedrock(), process="other").invoke_async("weather in Rome?", idempotency_token="t2"),
        WAIT + DEAD_LEASE,
    )
    assert shape(env.persisted()) == ONE_TURN * 2  # the first turn counted: it was not rolled back


async def test_the_default_scope_includes_the_session(tmp_path: Path) -> None:
    env = _Env(tmp_path)
    a, b = env.agent(ScriptedBedrock(), "conv-a"), env.agent(ScriptedBedrock(), "conv-b")
    assert a._idempotency_scope != b._idempotency_scope and "conv-a" not in a._idempotency_scope
    await asyncio.wait_for(a.invoke_async("weather?", idempotency_token="t1"), WAIT)
    other = await asyncio.wait_for(b.invoke_async("weather?", idempotency_token="t1"), WAIT)
    assert not isinstance(other, ReplayedAgentResult)


async def test_a_call_naming_a_session_is_locked_without_a_session_manager() -> None:
    config = IdempotencyConfig(store=InMemoryIdempotencyStore(), lease_seconds=LEASE)
    gate, script = _gated()
    first = Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=config)
    running = asyncio.create_task(first.invoke_async("weather?", session_id="conv-9"))
    await _until(script.entered.is_set, WAIT, "the first turn")
    second = Agent(model=ScriptedBedrock().model(), callback_handler=None, idempotency=config)
    with pytest.raises(SessionBusyError):
        await asyncio.wait_for(second.invoke_async("weather?", session_id="conv-9"), WAIT)
    assert (await asyncio.wait_for(second.invoke_async("weather?", session_id="conv-10"), WAIT)).stop_reason
    gate.set()
    await asyncio.wait_for(running, WAIT)
    with pytest.raises(ValueError):
        await second.invoke_async("weather?", session_id="")


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_rollback_the_prompt_is_there_twice(tmp_path: Path) -> None:
    with mock.patch.object(_Conversation, "rollback", lambda self, checkpoint, still_ours: self.reload()):
        await test_a_dead_turn_is_rolled_back_by_the_retry_and_the_dead_owner_writes_nothing(tmp_path)


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_rolling_back_a_stored_turn_loses_it(tmp_path: Path) -> None:
    async def judged_without_the_token(self: _lock.SessionLock, dead: IdempotencyRecord) -> dict[str, str] | None:
        # A judge that never reads the token's record: every dead turn is rolled back, answered or not.
        assert dead.checkpoint is not None
        return {"owner": dead.owner, "checkpoint": dead.checkpoint}

    with mock.patch.object(_lock.SessionLock, "_judge", judged_without_the_token):
        await test_a_turn_whose_result_was_stored_is_kept_when_its_owner_died_before_unlocking(tmp_path)


async def test_a_retry_waits_out_the_lock_of_its_own_dead_run_even_in_throw_mode(tmp_path: Path) -> None:
    env = _Env(tmp_path)
    agent = env.agent(ScriptedBedrock())
    scope = agent._idempotency_scope
    lock_key = session_lock_key(scope, "conv-1")
    now = time.time()
    dead_lock = IdempotencyRecord(
        lock_key,
        RecordState.IN_PROGRESS,
        "dead-owner",
        new_version(),
        60.0,  # silent for a whole minute before anyone may judge it gone: the rejection below is never a race
        now + 3600,
        checkpoint=json.dumps({"v": 1, "token": make_key(scope, "t1")}),
    )
    assert await env.config.store.claim(dead_lock, now) is None
    with pytest.raises(SessionBusyError):  # another request: rejected at once
        await asyncio.wait_for(env.agent(ScriptedBedrock()).invoke_async("hi", idempotency_token="t2"), WAIT)
    # the dead run's last heartbeat: from here it is silent, and judged gone after half a second of that
    assert await env.config.store.renew(
        lock_key, "dead-owner", version=new_version(), lease_seconds=0.5, expires_at=time.time() + 3600
    )
    # the same request (its dead run held the lock): waits for that lock's lease instead of a spurious 409
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t1"), WAIT)
    assert result.stop_reason == "end_turn" and shape(env.persisted()) == ONE_TURN


async def _one_token_two_conversations() -> None:
    # A configured scope keeps the session out of the key, so only the fingerprint tells the two turns apart.
    config = IdempotencyConfig(store=InMemoryIdempotencyStore(), scope="api", lease_seconds=LEASE)
    agent = Agent(model=ScriptedBedrock().model(), callback_handler=None, idempotency=config)
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t1", session_id="conv-a"), WAIT)
    other = Agent(model=ScriptedBedrock().model(), callback_handler=None, idempotency=config)
    with pytest.raises(IdempotencyKeyMismatchError):
        await asyncio.wait_for(other.invoke_async("weather?", idempotency_token="t1", session_id="conv-b"), WAIT)


async def test_one_token_in_two_conversations_of_a_configured_scope_is_a_mismatch() -> None:
    await _one_token_two_conversations()


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception)
async def test_negative_control_a_fingerprint_without_the_session_replays_another_conversation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strands_py.agent import agent as agent_module

    real = agent_module.request_fingerprint

    def without_session(scope: str, prompt: Any, options: dict[str, Any], key: Any) -> str:
        return real(scope, prompt, {k: v for k, v in options.items() if k != "session"}, key)

    monkeypatch.setattr(agent_module, "request_fingerprint", without_session)
    await _one_token_two_conversations()
