"""A sync ``agent(...)`` replay is answered on the caller's thread: no thread, no event loop, one store call."""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

import pytest
import strands.agent.agent as upstream_agent

from strands_py import Agent, IdempotencyKeyMismatchError, IdempotencyStoreError
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore, ReplayedAgentResult
from strands_py.testing import CountingStore, ScriptedBedrock


def _agent(store: Any, **config: Any) -> tuple[Agent, ScriptedBedrock]:
    script = ScriptedBedrock()
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope="s", **config),
    )
    return agent, script


def _no_sync_bridge() -> Any:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("strands started its thread and event loop for a replay")

    return mock.patch.object(upstream_agent, "run_async", refuse)


def test_a_sync_replay_starts_no_thread_and_no_event_loop() -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    first, _ = _agent(store)
    original = first("weather?", idempotency_token="req-1")
    agent, script = _agent(store)
    handler = mock.Mock()
    agent.callback_handler = handler
    threads = threading.active_count()
    with _no_sync_bridge():
        replay = agent("weather?", idempotency_token="req-1")
    assert isinstance(replay, ReplayedAgentResult) and str(replay) == str(original)
    assert script.model_calls == 0 and threading.active_count() == threads
    handler.assert_called_once_with(result=replay)
    assert store.calls["claim"] == 2 and store.calls["get"] == 0  # the primary's claim, then one for the replay
    # the agent is free afterwards, and the token still replays through the async path too
    assert agent("other", idempotency_token="req-2").stop_reason == "end_turn"


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_without_blocking_claims_the_sync_bridge_runs() -> None:
    store = InMemoryIdempotencyStore()
    _agent(store)[0]("weather?", idempotency_token="req-1")
    agent, _ = _agent(store)
    with mock.patch.object(InMemoryIdempotencyStore, "supports_blocking_claims", False), _no_sync_bridge():
        agent("weather?", idempotency_token="req-1")


def test_a_sync_mismatch_and_a_sync_store_outage_leave_nothing_held() -> None:
    store = InMemoryIdempotencyStore()
    _agent(store)[0]("weather in Paris?", idempotency_token="req-1")
    agent, _ = _agent(store)
    with pytest.raises(IdempotencyKeyMismatchError):
        agent("weather in Rome?", idempotency_token="req-1")
    with mock.patch.object(InMemoryIdempotencyStore, "claim_blocking", side_effect=ConnectionError("down")):
        with pytest.raises(IdempotencyStoreError):
            agent("weather?", idempotency_token="req-3")
    assert agent._idempotency_gate.inflight is None
    assert agent("weather?", idempotency_token="req-3").stop_reason == "end_turn"


def test_a_claim_taken_on_the_callers_thread_runs_once_and_is_completed() -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    agent, script = _agent(store)
    result = agent("weather?", idempotency_token="req-1")
    assert result.stop_reason == "end_turn" and script.model_calls == 2
    # one claim (on the caller's thread), no second claim, no poll; the journal's writes are the run's own business
    journal = ("append", "journal", "truncate")
    assert {op: n for op, n in store.calls.items() if op not in journal} == {"claim": 1, "complete": 1}


def test_a_call_strands_never_started_hands_its_claim_back() -> None:
    store = InMemoryIdempotencyStore()
    agent, _ = _agent(store)

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("could not start a thread")

    with mock.patch.object(upstream_agent, "run_async", broken), pytest.raises(RuntimeError):
        agent("weather?", idempotency_token="req-1")
    assert len(store) == 0 and agent._idempotency_gate.inflight is None
    assert agent("weather?", idempotency_token="req-1").stop_reason == "end_turn"
