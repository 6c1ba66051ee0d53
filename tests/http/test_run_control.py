"""Run control's pure parts: a run stopped on purpose, its phase, status bodies, where a status comes from."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics
from strands.types.exceptions import ConcurrencyException

from strands_py import IdempotencyLeaseLostError, InvocationCancelledError, SessionBusyError
from strands_py.http import AGENT_BUSY, CANCELLED, LEASE_LOST, NOT_FOUND, NOT_REPLAYABLE, SESSION_BUSY
from strands_py.http._control import RunControl, record_phase, record_status, run_status, status_path, timestamp
from strands_py.http._problems import Problem, cancelled_problem, problem_for, run_timeout_problem
from strands_py.http._protocol import ProblemError
from strands_py.http._registry import RunRegistry
from strands_py.http._runs import Run
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, RecordState
from strands_py.idempotency.codec import encode_result

WAIT = 5.0
MESSAGE = {"role": "assistant", "content": [{"text": "hello"}]}


def _result(stop_reason: str = "end_turn") -> AgentResult:
    return AgentResult(stop_reason=stop_reason, message=MESSAGE, metrics=EventLoopMetrics(), state={})  # type: ignore[arg-type]


class _Agent:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def _start(
    run: Run, stream: Any, agent: Any = None, before: asyncio.Event | None = None, entered: asyncio.Event | None = None
) -> None:
    """Start ``run`` on ``stream``; its agent (if any) is attached when the stream opens, after ``before``."""

    async def open_stream() -> AsyncIterator[Any]:
        if entered is not None:
            entered.set()
        if before is not None:
            await before.wait()
        run.agent = agent
        return stream

    run.start(
        open_stream, timeout_problem=run_timeout_problem(WAIT), timeout_seconds=WAIT, retry_after=1, on_settled=print
    )


async def _settled(run: Run) -> None:
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)


async def test_a_run_without_an_agent_yet_is_cancelled_through_its_task() -> None:
    run = Run("k", None, 10)
    waiting, entered = asyncio.Event(), asyncio.Event()
    _start(run, None, before=waiting, entered=entered)  # its agent is never built: the wait is cancelled
    await asyncio.wait_for(entered.wait(), WAIT)
    assert run.phase == "running"
    await asyncio.wait_for(asyncio.to_thread(run.request_cancel, cancelled_problem()), WAIT)
    await _settled(run)
    assert run.phase == "cancelled" and run.problem is not None and run.problem.type == CANCELLED
    assert run.failed_before_start
    run.request_cancel(cancelled_problem())  # finished: nothing happens
    Run("never", None, 1).request_cancel(cancelled_problem())  # never started: nothing happens


async def test_a_run_with_an_agent_is_cancelled_through_the_agent_and_its_cancelled_result_is_no_answer() -> None:
    run = Run("k", None, 10)
    agent = _Agent()
    asked = asyncio.Event()

    async def stream() -> AsyncIterator[Any]:
        yield {"data": "partial"}
        asked.set()
        await asyncio.wait_for(asyncio.to_thread(agent.cancelled.wait, WAIT), WAIT + 1)
        yield {"result": _result("cancelled")}  # strands' answer to agent.cancel()

    _start(run, stream(), agent)
    await asyncio.wait_for(asked.wait(), WAIT)
    run.request_cancel(cancelled_problem())
    assert run.phase == "cancelling" and run.cancel_requested
    run.request_cancel(cancelled_problem())  # a second request: the agent is asked once
    await _settled(run)
    assert agent.cancelled.is_set() and run.phase == "cancelled" and not run.succeeded
    assert run.problem is not None and run.problem.type == CANCELLED and not run.failed_before_start


async def test_a_cancelled_result_without_a_request_is_a_cancel_too() -> None:
    run = Run("k", None, 10)

    async def stream() -> AsyncIterator[Any]:
        yield {"result": _result("cancelled")}  # the owner learnt of a cancel from the store

    _start(run, stream(), _Agent())
    await _settled(run)
    assert run.phase == "cancelled" and run.problem is not None and run.problem.type == CANCELLED


@pytest.mark.parametrize("requested", [True, False])
async def test_a_lost_lease_after_a_cancel_request_is_the_cancel(requested: bool) -> None:
    run = Run("k", None, 10)
    opened, go = asyncio.Event(), asyncio.Event()

    async def stream() -> AsyncIterator[Any]:
        opened.set()
        await go.wait()
        raise IdempotencyLeaseLostError("k", "fenced off by the cancel's mark")
        yield  # an async generator

    _start(run, stream(), _Agent())
    await asyncio.wait_for(opened.wait(), WAIT)
    if requested:
        run.request_cancel(cancelled_problem())
    go.set()
    await _settled(run)
    assert run.problem is not None
    assert run.problem.type == (CANCELLED if requested else LEASE_LOST)


def test_errors_map_onto_the_cancel_and_busy_problems() -> None:
    assert problem_for(InvocationCancelledError("k", "cancelled"), 1).type == CANCELLED  # before a lost lease
    busy = problem_for(SessionBusyError("busy"), 3)
    assert busy.type == SESSION_BUSY and busy.status == 409 and busy.retry_after == 3
    assert problem_for(ConcurrencyException("agent busy"), 1).type == AGENT_BUSY
    assert cancelled_problem().status == 409 and cancelled_problem().retry_after is None


def test_timestamps_and_status_paths() -> None:
    assert timestamp(0) is None
    assert timestamp(1.5) == "1970-01-01T00:00:01.500Z"
    assert status_path("", "a/b c") == "/invocations/a%2Fb%20c"
    assert status_path("/agent", "k") == "/agent/invocations/k"


def _record(state: RecordState, **fields: Any) -> IdempotencyRecord:
    values: dict[str, Any] = {"lease_seconds": 5.0, "expires_at": 2e9, **fields}
    return IdempotencyRecord("s#k", state, "owner", "v", **values)


@pytest.mark.parametrize(
    ("record", "phase"),
    [
        (_record(RecordState.IN_PROGRESS), "running"),
        (_record(RecordState.IN_PROGRESS, cancelled=True), "cancelling"),
        (_record(RecordState.IN_PROGRESS, lease_seconds=0.0), "failed"),
        (_record(RecordState.IN_PROGRESS, lease_seconds=0.0, cancelled=True), "cancelled"),
        (_record(RecordState.CANCELLED, lease_seconds=0.0), "cancelled"),
        (_record(RecordState.COMPLETED, lease_seconds=0.0), "completed"),
    ],
)
def test_the_phase_a_record_says(record: IdempotencyRecord, phase: str) -> None:
    assert record_phase(record) == phase


def test_status_bodies_of_records() -> None:
    completed = _record(RecordState.COMPLETED, payload=encode_result(_result(), None))
    assert record_status(completed, "k")["result"]["message"] == MESSAGE
    too_large = _record(RecordState.COMPLETED, payload=encode_result(_result(), 8))
    body = record_status(too_large, "k")
    assert body["status"] == "completed" and body["problem"]["type"] == NOT_REPLAYABLE and "result" not in body
    running = record_status(_record(RecordState.IN_PROGRESS), "k")
    assert running["where"] == "elsewhere" and running["lease_seconds"] == 5.0
    assert record_status(_record(RecordState.CANCELLED), "k")["problem"]["type"] == CANCELLED


async def test_status_bodies_of_runs() -> None:
    class Place:
        session_id = "conv"

        def position(self) -> int:
            return 2

        def leave(self) -> None:
            pass

    run = Run("k", None, 10)
    run.place = Place()
    queued = run_status(run, "key", 30.0)
    assert queued["status"] == "queued" and queued["position"] == 2 and queued["session"] == "conv"
    assert run_status(run, "key", 30.0, marked=True)["status"] == "cancelling"
    run._decide(replayed=False)
    assert run_status(run, "key", 30.0)["status"] == "running" and run.position() == 0
    run._finish_error(Problem(500, "t", "failed", "d"))
    failed = run_status(run, "key", 30.0)
    assert failed["status"] == "failed" and failed["problem"]["status"] == 500 and "where" not in failed


def _control(run: Run | None) -> RunControl:
    registry = RunRegistry(8, 60)

    async def key_of(request: Any, token: str) -> str:
        return token

    return RunControl(IdempotencyConfig(), registry, key_of, 1)


def _finished(problem: Problem) -> Run:
    run = Run("k", None, 10)
    run.started_wall = 1.0
    run._finish_error(problem)
    return run


@pytest.mark.parametrize(
    ("run", "record", "status"),
    [
        (None, _record(RecordState.IN_PROGRESS), "running"),
        (_finished(Problem(500, "t", "f", "d")), None, "failed"),
        # Our failed run's yielded claim: our failure (with its problem) is the better answer.
        (_finished(Problem(500, "t", "f", "d")), _record(RecordState.IN_PROGRESS, lease_seconds=0.0), "failed"),
        # Run again since: completed, or running on another server.
        (
            _finished(Problem(500, "t", "f", "d")),
            _record(RecordState.COMPLETED, payload=encode_result(_result(), None)),
            "completed",
        ),
        (_finished(Problem(500, "t", "f", "d")), _record(RecordState.IN_PROGRESS), "running"),
        # A DELETE turned our failed run's yielded claim into a cancel.
        (
            _finished(Problem(500, "t", "f", "d")),
            _record(RecordState.IN_PROGRESS, lease_seconds=0.0, cancelled=True),
            "cancelled",
        ),
        # Our cancelled run whose mark fenced off its result: cancelled, not "cancelling".
        (_finished(cancelled_problem()), _record(RecordState.IN_PROGRESS, cancelled=True), "cancelled"),
    ],
)
def test_which_source_a_status_comes_from(run: Run | None, record: IdempotencyRecord | None, status: str) -> None:
    body = _control(run)._resolve(run, record, "k")
    assert body["status"] == status
    if run is not None and status in ("failed",):
        assert body["started_at"] is not None  # this server's run


def test_a_key_nobody_knows_is_404() -> None:
    with pytest.raises(ProblemError) as raised:
        _control(None)._resolve(None, None, "k")
    assert raised.value.problem.type == NOT_FOUND


async def test_a_run_cancelled_before_its_first_step_still_ends_with_the_cancel() -> None:
    run = Run("k", None, 10)
    _start(run, None)
    run.request_cancel(cancelled_problem())  # the task has not run yet: cancelled before it starts
    await _settled(run)
    assert run.finished and run.problem is not None and run.problem.type == CANCELLED
