"""A takeover resumes from the step journal: no journaled model call is paid twice, no journaled tool runs twice.

"Hosts" are agents whose store is a wrapper of their own around one shared in-memory store (the same records, none of
one process's in-memory sharing). The dead owner is a host whose heartbeats never beat, stopped at a chosen step by
a gate in its scripted model or tool; the next host takes its claim over once it has seen it silent for a lease.
The multi-process versions (SIGKILL, Redis, DynamoDB) live in integ_tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from strands import tool
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent, IdempotencyLeaseLostError, IdempotencyStoreError
from strands_py._demo.storm import _until
from strands_py.idempotency import IdempotencyConfig, IdempotencyStore, InMemoryIdempotencyStore
from strands_py.idempotency._heartbeat import _Lease
from strands_py.testing import STUB_ANSWER, CountingStore, ScriptedBedrock
from strands_py.turn._claim import DurableCall
from strands_py.turn._journaled import UNCERTAIN_REPORT

WAIT = 20.0
LEASE = 1.5  # renewals every 0.5 s: a whole second of margin for a loaded machine

# The dead owner is a real thread blocked in a model call or a tool while another host takes its claim over.
pytestmark = pytest.mark.racing


@contextmanager
def _no_heartbeats() -> Iterator[None]:
    """Leases started inside are never renewed: their owner looks dead to everyone else after a lease of silence."""

    async def silent(self: _Lease) -> None:
        return None

    with mock.patch.object(_Lease, "_renew_forever", silent):
        yield


class _Script(ScriptedBedrock):
    """The scripted two-step turn (a tool call, then the answer), whose owner can be stopped at one step.

    ``stop_at``: ``"answer"`` holds the second model call at a gate (the tool's result is journaled by then);
    ``"tool"`` holds the tool inside its run (marked started, no result).
    """

    def __init__(self, stop_at: str | None = None) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.stopped = threading.Event()
        self.release = threading.Event()
        self.tool_inputs: list[Any] = []

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        answering = any("toolResult" in block for block in request["messages"][-1]["content"])
        if self.stop_at == "answer" and answering:
            self.stopped.set()
            self.release.wait(WAIT)
        return super().converse_stream(**request)

    def tools(self) -> list[Any]:
        script = self

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: The city.
            """
            script.tool_inputs.append(city)
            script.tool_calls += 1
            if script.stop_at == "tool":
                script.stopped.set()
                script.release.wait(WAIT)
            return f"{city}: sunny, 21 degrees"

        return [lookup_weather]


class _Hosts:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.dir = str(tmp_path / "sessions")
        self.inner = InMemoryIdempotencyStore()
        config.setdefault("lease_seconds", LEASE)
        self.config = IdempotencyConfig(store=self.inner, scope="s", **config)

    def agent(self, script: ScriptedBedrock, *, session: bool = False, **overrides: Any) -> Agent:
        config = dataclasses.replace(self.config, store=CountingStore(self.inner), **overrides)
        extra: dict[str, Any] = {}
        if session:
            extra["session_manager"] = FileSessionManager(session_id="conv-1", storage_dir=self.dir)
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=config, **extra)

    def messages(self) -> list[Any]:
        """The persisted conversation: each message's role and content (not per-message ids newer strands adds)."""
        manager = FileSessionManager(session_id="conv-1", storage_dir=self.dir)
        return [
            {"role": m.to_message()["role"], "content": m.to_message()["content"]}
            for m in manager.list_messages("conv-1", "default")
        ]


async def _crash_then_resume(
    hosts: _Hosts, stop_at: str, *, session: bool = False, **resume_config: Any
) -> tuple[_Script, _Script, Any]:
    """Host A runs the turn and stops at ``stop_at`` for good; host B's retry takes over. Returns both scripts and
    B's result. A is released (its writes fenced) before returning."""
    dead = _Script(stop_at)
    with _no_heartbeats():
        first = asyncio.create_task(
            hosts.agent(dead, session=session).invoke_async("weather in Paris?", idempotency_token="t1")
        )
        await _until(dead.stopped.is_set, WAIT, f"host A to stop at its {stop_at}")
    try:
        resumed = _Script()
        result = await asyncio.wait_for(
            hosts.agent(resumed, session=session, **resume_config).invoke_async(
                "weather in Paris?", idempotency_token="t1"
            ),
            WAIT,
        )
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    assert first.done()
    if not first.cancelled() and first.exception() is not None:
        assert isinstance(first.exception(), IdempotencyLeaseLostError)
    return dead, resumed, result


def _text(result: Any) -> str:
    return "".join(block.get("text", "") for block in result.message["content"])


async def test_a_takeover_after_the_tool_pays_only_the_missing_model_call(tmp_path: Path) -> None:
    dead, resumed, result = await _crash_then_resume(_Hosts(tmp_path), "answer")
    assert _text(result) == STUB_ANSWER
    assert (dead.model_calls, dead.tool_calls) == (2, 1)  # its answer call was paid, never journaled
    assert (resumed.model_calls, resumed.tool_calls) == (1, 0), "a journaled step was paid again"


async def test_without_the_journal_a_takeover_pays_the_whole_turn_again(tmp_path: Path) -> None:
    # The same crash with journal=False: what the journal saves (every step is paid twice).
    dead, resumed, result = await _crash_then_resume(_Hosts(tmp_path, journal=False), "answer")
    assert _text(result) == STUB_ANSWER
    assert (resumed.model_calls, resumed.tool_calls) == (2, 1)


async def test_a_tool_that_died_mid_run_is_reported_to_the_model_by_default(tmp_path: Path) -> None:
    dead, resumed, result = await _crash_then_resume(_Hosts(tmp_path), "tool")
    assert (dead.model_calls, dead.tool_calls) == (1, 1)
    assert (resumed.model_calls, resumed.tool_calls) == (1, 0), "the uncertain tool ran again"
    assert result.stop_reason == "end_turn"


async def test_a_tool_marked_retry_runs_again_with_the_same_tool_key(tmp_path: Path) -> None:
    dead, resumed, _ = await _crash_then_resume(_Hosts(tmp_path, uncertain_tools={"lookup_weather": "retry"}), "tool")
    assert (resumed.model_calls, resumed.tool_calls) == (1, 1)
    assert resumed.tool_inputs == dead.tool_inputs == ["Paris"]


@pytest.mark.parametrize("answer", ["found", "absent"])
async def test_a_reconcile_function_decides_an_uncertain_tool(tmp_path: Path, answer: str) -> None:
    asked: list[tuple[str | None, Any]] = []

    def reconcile(key: str | None, tool_input: Any) -> str | None:
        asked.append((key, tool_input))
        return "Paris: sunny (from the weather service's log)" if answer == "found" else None

    hosts = _Hosts(tmp_path, uncertain_tools={"lookup_weather": reconcile})
    _, resumed, _ = await _crash_then_resume(hosts, "tool")
    assert len(asked) == 1 and asked[0][1] == {"city": "Paris"}
    assert isinstance(asked[0][0], str) and len(asked[0][0]) == 64  # the call's tool idempotency key
    assert resumed.tool_calls == (0 if answer == "found" else 1)
    assert resumed.model_calls == 1


async def test_a_changed_request_is_never_answered_from_the_journal(tmp_path: Path) -> None:
    # Between the crash and the resume the agent changed (another system prompt): the journaled model step was
    # recorded for another request, so the replay stops at once and the whole turn runs live.
    hosts = _Hosts(tmp_path)
    dead = _Script("answer")
    with _no_heartbeats():
        first = asyncio.create_task(hosts.agent(dead).invoke_async("weather in Paris?", idempotency_token="t1"))
        await _until(dead.stopped.is_set, WAIT, "host A to stop")
    try:
        resumed = _Script()
        changed = hosts.agent(resumed)
        changed.system_prompt = "You are terse."
        result = await asyncio.wait_for(changed.invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    assert _text(result) == STUB_ANSWER
    # Every model call made again; the very same tool call (same tool-call key) answered from the journal.
    assert (resumed.model_calls, resumed.tool_calls) == (2, 0)


async def test_the_resumed_conversation_is_the_one_the_dead_owner_was_building(tmp_path: Path) -> None:
    reference = _Hosts(tmp_path / "reference")
    await asyncio.wait_for(
        reference.agent(_Script(), session=True).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
    )
    hosts = _Hosts(tmp_path / "crashed", session_invocation_mode="enqueue")
    _, resumed, _ = await _crash_then_resume(hosts, "answer", session=True)
    assert (resumed.model_calls, resumed.tool_calls) == (1, 0)
    assert hosts.messages() == reference.messages()


class _TinyEntries(CountingStore):
    """A store whose journal entries hold at most 64 bytes: every step is split over several."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.max_journal_entry_bytes = 64


async def test_steps_larger_than_a_store_entry_are_split_and_joined(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    dead = _Script("answer")
    with _no_heartbeats():
        first = asyncio.create_task(
            Agent(
                model=dead.model(),
                tools=dead.tools(),
                callback_handler=None,
                idempotency=dataclasses.replace(hosts.config, store=_TinyEntries(hosts.inner)),
            ).invoke_async("weather in Paris?", idempotency_token="t1")
        )
        await _until(dead.stopped.is_set, WAIT, "host A to stop")
    try:
        resumed = _Script()
        await asyncio.wait_for(hosts.agent(resumed).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    assert (resumed.model_calls, resumed.tool_calls) == (1, 0)


async def test_a_step_over_the_step_limit_is_not_journaled_and_runs_again(tmp_path: Path) -> None:
    dead, resumed, _ = await _crash_then_resume(_Hosts(tmp_path, journal_max_step_bytes=64), "answer")
    assert (resumed.model_calls, resumed.tool_calls) == (2, 1)


def test_the_default_for_uncertain_tools_is_report_and_policies_are_checked() -> None:
    config = IdempotencyConfig()
    assert config.uncertain_tool_default == "report" and config.journaled
    assert "unknown" in UNCERTAIN_REPORT
    with pytest.raises(ValueError, match="uncertain-tool policy of 'pay'"):
        IdempotencyConfig(uncertain_tools={"pay": "maybe"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="journal_max_step_bytes"):
        IdempotencyConfig(journal_max_step_bytes=0)


async def test_journal_true_needs_a_store_with_a_journal() -> None:
    class NoJournal(CountingStore):
        supports_journal = False

    store = NoJournal(InMemoryIdempotencyStore())
    store.supports_journal = False
    with pytest.raises(ValueError, match="does not support journals"):
        IdempotencyConfig(store=store, journal=True)
    assert IdempotencyConfig(store=store).journaled is False


# -- the same tool call, asked again after the request changed -------------------------------------------------------


async def _another_turn_runs_in_between(hosts: _Hosts) -> tuple[_Script, Any]:
    """Host A runs a session turn to its answer (its tool journaled) and dies; another request's turn runs on the
    conversation meanwhile; then A's retry: the request differs (a turn came in between), so nothing is replayed,
    and the model asks for the very same tool call again."""
    dead = _Script("answer")
    with _no_heartbeats():
        first = asyncio.create_task(
            hosts.agent(dead, session=True).invoke_async("weather in Paris?", idempotency_token="t1")
        )
        await _until(dead.stopped.is_set, WAIT, "host A to stop at its answer")
    try:
        between = hosts.agent(_Script(), session=True)
        await asyncio.wait_for(between.invoke_async("and in Rome?", idempotency_token="t2"), WAIT)
        resumed = _Script()
        result = await asyncio.wait_for(
            hosts.agent(resumed, session=True).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
        )
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    return resumed, result


async def test_a_tool_call_asked_again_after_the_request_changed_is_not_run_again(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path, session_invocation_mode="enqueue")
    resumed, result = await _another_turn_runs_in_between(hosts)
    assert result.stop_reason == "end_turn"
    assert resumed.model_calls == 2, "the changed request must not be answered from the journal"
    assert resumed.tool_calls == 0, "the tool call already made (same tool-call key) ran again"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: tool steps found by id only")
async def test_negative_control_tool_steps_found_by_id_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from strands_py.turn._journal import Journal

    result, started = Journal.tool_result, Journal.tool_started
    monkeypatch.setattr(Journal, "tool_result", lambda self, tool_use_id, tool_key: result(self, tool_use_id, None))
    monkeypatch.setattr(Journal, "tool_started", lambda self, tool_use_id, tool_key: started(self, tool_use_id, None))
    await test_a_tool_call_asked_again_after_the_request_changed_is_not_run_again(tmp_path)


# -- a stream a cancel cut short ------------------------------------------------------------------------------------


async def test_a_response_cut_short_without_an_error_is_not_journaled(tmp_path: Path) -> None:
    from strands_py.turn._journal import Journal
    from strands_py.turn._journaled import JournaledModel

    class Stops:  # a provider that stops reading when the cancel signal is set, and simply returns
        async def stream(self, *args: Any, **kwargs: Any) -> Any:
            yield {"messageStart": {"role": "assistant"}}
            yield {"contentBlockDelta": {"delta": {"text": "It is"}, "contentBlockIndex": 0}}

    class Whole(Stops):
        async def stream(self, *args: Any, **kwargs: Any) -> Any:
            async for chunk in super().stream():
                yield chunk
            yield {"messageStop": {"stopReason": "end_turn"}}

    store = InMemoryIdempotencyStore()
    config = IdempotencyConfig(store=store, scope="s")
    record = _claim_for(config, "k")
    assert await store.claim(record, record.expires_at - 60) is None
    for model, entries in ((Stops(), 0), (Whole(), 1)):
        journal = Journal(store, "s#k", record.owner, max_step_bytes=1 << 20)
        before = len(await store.journal("s#k"))
        async for _ in JournaledModel(model, journal).stream([{"role": "user", "content": [{"text": "hi"}]}]):
            pass
        assert len(await store.journal("s#k")) - before == entries


def _claim_for(config: IdempotencyConfig, token: str) -> Any:
    return DurableCall(config=config, key=f"s#{token}", fingerprint=None, structured_output_model=None).claim_record(
        time.time()
    )


# -- a tool call that could not be marked started -------------------------------------------------------------------


class _OutageFromToolStart(CountingStore):
    """From the first tool-start mark on, every journal append fails: a store outage at the worst moment."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.down = False

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        if self.down or b"started" in entry:
            self.down = True
            raise IdempotencyStoreError("the store is unavailable")
        return await super().append(key, owner, entry)


async def test_a_tool_call_that_cannot_be_marked_started_does_not_run_and_runs_once_on_the_retry(
    tmp_path: Path,
) -> None:
    # Was (seen by the chaos run on DynamoDB): the failed mark was logged and the tool ran anyway; its owner died
    # before the result was journaled, and the owner that took over found nothing saying the tool had started, so
    # it ran it again: the side effect twice.
    hosts = _Hosts(tmp_path)
    dead = _Script("answer")
    config = dataclasses.replace(hosts.config, store=_OutageFromToolStart(hosts.inner))
    owner = Agent(model=dead.model(), tools=dead.tools(), callback_handler=None, idempotency=config)
    with _no_heartbeats():  # an owner that reaches its answer hangs there for good: it looks dead
        first = asyncio.create_task(owner.invoke_async("weather in Paris?", idempotency_token="t1"))
        await _until(lambda: dead.stopped.is_set() or first.done(), WAIT, "host A to fail or to hang at its answer")
    try:
        resumed = _Script()
        result = await asyncio.wait_for(
            hosts.agent(resumed).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
        )
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    assert result.stop_reason == "end_turn"
    assert dead.tool_calls + resumed.tool_calls == 1, "the tool ran twice"
    assert dead.model_calls == 1, "host A went on after a tool call it could not mark"
    with pytest.raises(IdempotencyStoreError):
        first.result()


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a tool run without its start mark")
async def test_negative_control_a_tool_run_without_its_start_mark_runs_again_on_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strands_py.turn._journal import Journal

    real = Journal.record_started

    async def logged_only(self: Journal, tool_use_id: str, name: str, tool_key: str | None) -> None:
        try:
            await real(self, tool_use_id, name, tool_key)
        except IdempotencyStoreError:
            pass  # the old behaviour: logged, and the tool ran

    monkeypatch.setattr(Journal, "record_started", logged_only)
    await test_a_tool_call_that_cannot_be_marked_started_does_not_run_and_runs_once_on_the_retry(tmp_path)


# -- a takeover whose answer was lost ---------------------------------------------------------------------------------


class _TakeoverAnswerLost(CountingStore):
    """The first takeover lands, and then its caller hears otherwise.

    ``"refused"``: the connection dropped after the write was applied and the client sent it again; the retry met the
    write itself and failed its version condition (botocore's and redis-py's retries do exactly this).
    ``"raised"``: the client gave up (a read timeout after its retries): the call raises although the write landed.
    """

    def __init__(self, inner: IdempotencyStore, heard: str) -> None:
        super().__init__(inner)
        self.heard = heard
        self.lost = False

    async def take_over(self, record: Any, version: str) -> bool:
        won = await super().take_over(record, version)
        if won and not self.lost:
            self.lost = True
            if self.heard == "raised":
                raise TimeoutError("read timeout on endpoint URL (the UpdateItem was applied)")
            return False
        return won


async def _takeover_answer_lost(tmp_path: Path, heard: str) -> tuple[_Script, _Script]:
    """Host A dies at its answer (its tool result journaled); host B's takeover lands but B hears otherwise. Returns
    A's script and the script of the run that answered (B's, or B's retry's when B's call failed)."""
    hosts = _Hosts(tmp_path)
    dead = _Script("answer")
    with _no_heartbeats():
        first = asyncio.create_task(hosts.agent(dead).invoke_async("weather in Paris?", idempotency_token="t1"))
        await _until(dead.stopped.is_set, WAIT, "host A to stop at its answer")
    try:
        resumed = _Script()
        config = dataclasses.replace(hosts.config, store=_TakeoverAnswerLost(hosts.inner, heard))
        taker = Agent(model=resumed.model(), tools=resumed.tools(), callback_handler=None, idempotency=config)
        if heard == "raised":
            # The store error reaches B's caller (HTTP: 503); its retry, from another host, resumes.
            with pytest.raises(IdempotencyStoreError):
                await asyncio.wait_for(taker.invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
            resumed = _Script()
            taker = hosts.agent(resumed)
        result = await asyncio.wait_for(taker.invoke_async("weather in Paris?", idempotency_token="t1"), WAIT)
    finally:
        dead.release.set()
        await asyncio.wait([first], timeout=WAIT)
    assert _text(result) == STUB_ANSWER
    return dead, resumed


@pytest.mark.parametrize("heard", ["refused", "raised"])
async def test_a_takeover_whose_answer_was_lost_still_resumes_from_the_journal(tmp_path: Path, heard: str) -> None:
    # Was (seen by the DynamoDB chaos run, a store connection dropped mid-takeover): botocore sent the takeover again,
    # the retry met the takeover itself and failed its version condition; the claim that followed found a record of
    # ours and counted it as a fresh claim, so the journal was never read and both completed tools ran again. And a
    # takeover that raised after landing was handed back by a release, which deleted the dead owner's journal.
    dead, resumed = await _takeover_answer_lost(tmp_path, heard)
    assert (dead.model_calls, dead.tool_calls) == (2, 1)
    assert (resumed.model_calls, resumed.tool_calls) == (1, 0), "a journaled step was paid again"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: our own takeover read as a claim")
async def test_negative_control_a_takeover_met_again_counts_as_a_fresh_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strands_py.turn import _run

    real = _run.claim_or_wait

    async def fresh_when_met_again(call: DurableCall, *args: Any, **kwargs: Any) -> Any:
        completed, sent, took_over = await real(call, *args, **kwargs)
        store = call.config.store
        # The old claim: only a takeover whose answer said so counted as one.
        return completed, sent, took_over and not (isinstance(store, _TakeoverAnswerLost) and store.lost)

    monkeypatch.setattr(_run, "claim_or_wait", fresh_when_met_again)
    await test_a_takeover_whose_answer_was_lost_still_resumes_from_the_journal(tmp_path, "refused")


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a landed takeover released")
async def test_negative_control_a_takeover_that_raised_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DurableCall, "yield_claim", DurableCall.release)  # the old hand-back, the journal deleted
    await test_a_takeover_whose_answer_was_lost_still_resumes_from_the_journal(tmp_path, "raised")


# -- a start mark slower than the lease -----------------------------------------------------------------------------


class _SlowStartMark(CountingStore):
    """The tool call's "started" mark lands, and its answer comes back only when ``answer`` is set."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.marked = asyncio.Event()
        self.answer = asyncio.Event()

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        appended = await super().append(key, owner, entry)
        if b"started" in entry and not self.marked.is_set():
            self.marked.set()
            await asyncio.wait_for(self.answer.wait(), WAIT)
        return appended


async def test_a_tool_whose_start_mark_outlasted_the_lease_does_not_run(tmp_path: Path) -> None:
    # Was (seen by the DynamoDB chaos run, under a store delay): the mark took longer than the lease; another owner took
    # the claim over meanwhile, found the mark without a result and ran the call by its policy; then the first owner's
    # mark returned, and it ran the call too: its effect twice, 0.8 s apart.
    hosts = _Hosts(tmp_path)
    slow = _SlowStartMark(hosts.inner)
    dead = _Script()
    owner = Agent(
        model=dead.model(),
        tools=dead.tools(),
        callback_handler=None,
        idempotency=dataclasses.replace(hosts.config, store=slow),
    )
    with _no_heartbeats():
        first = asyncio.create_task(owner.invoke_async("weather in Paris?", idempotency_token="t1"))
        await asyncio.wait_for(slow.marked.wait(), WAIT)
    try:
        resumed = _Script()
        result = await asyncio.wait_for(
            hosts.agent(resumed, uncertain_tool_default="retry").invoke_async(
                "weather in Paris?", idempotency_token="t1"
            ),
            WAIT,
        )
    finally:
        slow.answer.set()  # the first owner's mark comes back, after its lease ran out
        await asyncio.wait([first], timeout=WAIT)
    assert result.stop_reason == "end_turn" and resumed.tool_calls == 1
    assert dead.tool_calls == 0, "the tool ran twice: by the owner that took over, and by the one whose lease ran out"
    with pytest.raises(IdempotencyLeaseLostError):
        first.result()


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: the lease unchecked after the mark")
async def test_negative_control_a_tool_runs_whatever_its_lease_after_the_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strands_py.idempotency._context import _RunContext

    real = _RunContext.lease_lost
    checks = 0

    def unchecked_after_the_mark(self: _RunContext) -> bool:
        # The first check of each call is strands' hook before the mark; the one after the mark is skipped.
        nonlocal checks
        checks += 1
        return real(self) if checks % 2 else False

    monkeypatch.setattr(_RunContext, "lease_lost", unchecked_after_the_mark)
    await test_a_tool_whose_start_mark_outlasted_the_lease_does_not_run(tmp_path)
