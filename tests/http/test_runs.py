from __future__ import annotations

import asyncio
import datetime
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics

from strands_py._demo.storm import _until
from strands_py.http._options import ServingOptions
from strands_py.http._problems import Problem, run_timeout_problem
from strands_py.http._registry import RunRegistry
from strands_py.http._runs import Run
from strands_py.http._wire import EventTranslator, dumps

WAIT = 5.0
MESSAGE = {"role": "assistant", "content": [{"text": "hello world"}]}


def _result() -> AgentResult:
    return AgentResult(stop_reason="end_turn", message=MESSAGE, metrics=EventLoopMetrics(), state={})  # type: ignore[arg-type]


def _events(*texts: str) -> list[dict[str, Any]]:
    return [{"init_event_loop": True}, *({"data": t} for t in texts), {"message": MESSAGE}, {"result": _result()}]


async def _stream(events: list[dict[str, Any]], gate: asyncio.Event | None = None) -> AsyncIterator[Any]:
    for index, event in enumerate(events):
        if gate is not None and index == 2:
            await gate.wait()
        yield event


def _start(run: Run, events: list[dict[str, Any]], gate: asyncio.Event | None = None, timeout: float = WAIT) -> None:
    async def open_stream() -> AsyncIterator[Any]:
        return _stream(events, gate)

    run.start(
        open_stream,
        timeout_problem=run_timeout_problem(timeout),
        timeout_seconds=timeout,
        retry_after=1,
        on_settled=lambda _: None,
    )


def _frames(run: Run, start: int = 0) -> list[str]:
    events, _, _ = run.read(start)
    return [e.frame.decode() for e in events]


async def test_a_follower_on_another_loop_and_thread_gets_every_event() -> None:
    run = Run("k", None, 100)
    gate = asyncio.Event()
    _start(run, _events("a", "b", "c"), gate)
    await asyncio.wait_for(run.wait(lambda r: r.decided), WAIT)
    received: list[bytes] = []
    first = threading.Event()

    def follow() -> None:
        async def main() -> None:
            async for frame in run.events(0, keepalive_seconds=WAIT):
                received.append(frame)
                first.set()  # then it waits, on its own loop, for events appended on the test's loop

        asyncio.run(asyncio.wait_for(main(), WAIT))

    follower = threading.Thread(target=follow)
    follower.start()
    assert await asyncio.wait_for(asyncio.to_thread(first.wait, WAIT), WAIT + 1)
    gate.set()
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    await asyncio.wait_for(asyncio.to_thread(follower.join, WAIT), WAIT + 1)
    # An item may hold several frames (a follower that fell behind catches up in one write).
    frames = [f for f in b"".join(received).split(b"\n\n") if f]
    assert [f.split(b"\n")[1] for f in frames] == [b"event: data"] * 3 + [b"event: message", b"event: result"]


async def test_a_follower_whose_loop_closed_is_skipped() -> None:
    run = Run("k", None, 100)
    gate = asyncio.Event()
    _start(run, _events("a", "b"), gate)
    await asyncio.wait_for(run.wait(lambda r: r.decided), WAIT)
    other = asyncio.new_event_loop()
    future = other.create_future()
    run._waiters.append((other, future))
    other.close()
    gate.set()  # notifying the closed loop raises inside call_soon_threadsafe: ignored
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    assert run.succeeded


async def test_the_buffer_keeps_whole_events_past_its_cap_and_positions_stay_true() -> None:
    run = Run("k", None, 2)
    _start(run, _events("a", "b", "c", "d"))
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    frames = _frames(run)
    assert [f.split("\n")[1] for f in frames] == ["event: data", "event: data", "event: message", "event: result"]
    tag = run._tag
    assert [f.split("\n")[0] for f in frames] == [f"id: {tag}:1", f"id: {tag}:2", f"id: {tag}:5", f"id: {tag}:6"]
    assert run.start_index((tag, 2)) == 2 and run.start_index((tag, 3)) == 2 and run.start_index((tag, 6)) == 4
    assert run.start_index(("other", 2)) == 0 and run.start_index(None) == 0
    assert run.at_end(4) and not run.at_end(3)


async def test_keepalive_comments_while_idle_and_a_cancelled_follower_leaves_no_waiter() -> None:
    run = Run("k", None, 100)
    gate = asyncio.Event()
    _start(run, _events("a"), gate)
    await asyncio.wait_for(run.wait(lambda r: r.decided), WAIT)
    frames = run.events(0, keepalive_seconds=0.01)
    assert (await asyncio.wait_for(frames.__anext__(), WAIT)).startswith(b"id: ")
    assert await asyncio.wait_for(frames.__anext__(), WAIT) == b": keepalive\n\n"
    await frames.aclose()
    assert run._waiters == []
    gate.set()
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)


async def test_a_cancelled_wait_for_a_state_leaves_no_waiter_and_others_still_wake() -> None:
    run = Run("k", None, 100)
    gate = asyncio.Event()
    _start(run, _events("a"), gate)
    await asyncio.wait_for(run.wait(lambda r: r.decided), WAIT)
    given_up = asyncio.ensure_future(run.wait(lambda r: r.finished))
    kept = asyncio.ensure_future(run.wait(lambda r: r.finished))
    await _until(lambda: len(run._state_waiters) == 2, WAIT, "both waiters")
    given_up.cancel()
    await asyncio.wait([given_up], timeout=WAIT)
    assert given_up.cancelled() and len(run._state_waiters) == 1
    gate.set()
    await asyncio.wait_for(kept, WAIT)
    assert run.finished and run._state_waiters == []


async def test_timeout_cancels_the_run_and_the_problem_is_its_last_event() -> None:
    run = Run("k", None, 100)
    _start(run, _events("a"), asyncio.Event(), timeout=0.01)
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    assert run.problem is not None and run.problem.status == 504
    assert json.loads(_frames(run)[-1].split("data: ")[1])["status"] == 504
    assert not run.failed_before_start


async def test_cancel_from_another_thread_and_a_cancel_after_the_end() -> None:
    run = Run("k", None, 100)
    gate = asyncio.Event()
    _start(run, [{"init_event_loop": True}, {"start": True}, {"data": "never"}], gate)
    shutdown = Problem(503, "t", "Shutting down", "d", 1)
    await asyncio.wait_for(asyncio.to_thread(run.cancel, shutdown), WAIT)
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    assert run.problem is shutdown and run.failed_before_start
    run.cancel(shutdown)  # ended: nothing to cancel
    Run("k", None, 1).cancel(shutdown)  # never started: nothing to cancel


async def test_streams_that_end_without_a_result_or_fail_to_open_are_failures() -> None:
    ended = Run("k", None, 100)
    _start(ended, [{"data": "a"}])
    failed = Run("k", None, 100)

    async def broken() -> AsyncIterator[Any]:
        raise ValueError("no agent")

    failed.start(broken, timeout_problem=run_timeout_problem(1), timeout_seconds=WAIT, retry_after=1, on_settled=print)
    for run in (ended, failed):
        await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
        assert run.problem is not None and run.problem.status == 500
    ended._finish_error(Problem(503, "t", "late", "d"))  # a run ends once
    assert ended.problem is not None and ended.problem.status == 500


async def test_registry_keeps_finished_runs_briefly_and_boundedly() -> None:
    registry = RunRegistry(retain_runs=2, retain_seconds=60)
    runs = [Run(f"k{i}", None, 10) for i in range(3)]
    for run in runs:
        registry.add(run)
        run._finish()
        registry.settled(run)
    assert registry.find("k0") is None and registry.find("k1") is runs[1] and registry.find("k2") is runs[2]
    replaced, replacement = Run("k3", None, 10), Run("k3", None, 10)
    registry.add(replaced)
    registry.add(replacement)
    registry.settled(replaced)  # a run replaced by a newer one of its key is not retained
    assert registry.find("k3") is replacement and registry.active == 1
    registry.settled(Run(None, None, 1))  # keyless runs are never retained
    expired = RunRegistry(retain_runs=2, retain_seconds=0.000001)
    run = Run("k", None, 10)
    expired.add(run)
    run._finish()
    run.finished_at -= 1
    expired.settled(run)
    assert expired.find("k") is None
    registry.clear()
    assert registry.find("k1") is None


def test_translation_and_json_of_what_strands_emits() -> None:
    translator = EventTranslator()
    tool = {"current_tool_use": {"toolUseId": "t1", "name": "lookup", "input": "{"}}
    assert list(translator.translate(tool)) == [("tool_use", {"tool_use_id": "t1", "name": "lookup"})]
    assert list(translator.translate(tool)) == []  # once per tool use
    assert list(translator.translate({"reasoningText": "hmm", "reasoning": True})) == [("reasoning", {"text": "hmm"})]
    assert list(translator.translate("not a dict")) == [] and list(translator.translate({"data": ""})) == []

    class Model(BaseModel):
        x: int

    when = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert json.loads(dumps({"b": b"\x00\xff", "m": Model(x=1), "t": when, "s": {1}, "o": object, "é": "ü"})) == {
        "b": "AP8=",
        "m": {"x": 1},
        "t": "2025-01-02T03:04:05",
        "s": [1],
        "o": "<class 'object'>",
        "é": "ü",
    }


@pytest.mark.parametrize(
    "options",
    [
        {"run_timeout_seconds": 0},
        {"keepalive_seconds": float("inf")},
        {"shutdown_grace_seconds": -1},
        {"max_concurrent_runs": -1},
        {"reconnect_millis": -1},
    ],
)
def test_serving_options_are_validated(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServingOptions(**options)


class _Journal:
    """A journal as the run sees it: the lineage tag, and whether the run went live (replayed steps before)."""

    run_tag = "lineage"
    live = False


async def test_a_run_that_goes_live_at_a_raw_chunk_and_fails_still_rewinds_a_re_attached_client() -> None:
    # Event 1 replays an earlier owner's step; the run goes live at a model chunk (no wire event) and fails. A client
    # that saw the earlier owner's events up to 5 must get a rewind to 1, then the error. Seen failing (no frontier,
    # an empty stream) when events without wire events skipped the frontier's check.
    journal = _Journal()
    run = Run("k", None, 100)
    settled = asyncio.Event()

    async def stream() -> AsyncIterator[Any]:
        yield {"data": "replayed"}
        journal.live = True
        yield {"event": {"messageStart": {"role": "assistant"}}}
        raise RuntimeError("the model failed")

    async def open_stream() -> AsyncIterator[Any]:
        return stream()

    run.start(
        open_stream,
        timeout_problem=run_timeout_problem(WAIT),
        timeout_seconds=WAIT,
        retry_after=1,
        on_settled=lambda _: settled.set(),
        journal_of=lambda: journal,
    )
    await asyncio.wait_for(settled.wait(), WAIT)
    last_event_id = ("lineage.abcd", 5)
    start, seen = run.start_index(last_event_id), run.seen_by(last_event_id)
    body = b"".join([frames async for frames in run.events(start, WAIT, seen)]).decode()
    assert "event: rewind" in body and '"to":1' in body and "event: error" in body, body
