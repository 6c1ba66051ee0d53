"""Runs as A2A sees them: a task's snapshot then its updates, never a chunk twice; and tasks known from the store.

The runs here are recorded by hand (the run's own recording methods), so that a follower can be placed exactly
between two events. The negative control follows a run from the start instead of from its snapshot: the chunks
the snapshot already holds come again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from a2a.types import Task, TaskArtifactUpdateEvent, TaskState, TaskStatusUpdateEvent

from strands_py.a2a._errors import RpcError
from strands_py.a2a._tasks import TaskView, absorb_all, follow_run, follow_started, follow_stored, updates, wire_event
from strands_py.http._problems import STORE_UNAVAILABLE, Problem, cancelled_problem
from strands_py.http._registry import RunRegistry
from strands_py.http._runs import Run
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.record import new_version
from strands_py.types.exceptions import IdempotencyStoreError

WAIT = 10.0
CHUNKS = ["It ", "is ", "sunny ", "in ", "Paris."]
RESULT = {"stop_reason": "end_turn", "message": {"role": "assistant", "content": [{"text": "".join(CHUNKS)}]}}


def _run() -> Run:
    run = Run("scope#key", None, 100)
    run._decide(replayed=False)
    return run


def _view() -> TaskView:
    return TaskView("task-1", "ctx-1", "0" * 64, None)


def _text(events: list[Any]) -> str:
    text = ""
    for item in events:
        if isinstance(item, Task) and item.artifacts:
            text = item.artifacts[0].parts[0].root.text
        elif isinstance(item, TaskArtifactUpdateEvent) and not item.last_chunk:
            text = text + item.artifact.parts[0].root.text if item.append else item.artifact.parts[0].root.text
    return text


@pytest.mark.parametrize("from_snapshot", [True, False], ids=["from-snapshot", "from-start-control"])
async def test_a_follower_that_joins_mid_answer_gets_each_chunk_once(from_snapshot: bool) -> None:
    run = _run()
    for chunk in CHUNKS[:2]:
        run._append("data", {"text": chunk})
    view = _view()
    start = absorb_all(view, run)
    snapshot = view.task()
    following = updates(run, view, start if from_snapshot else 0, WAIT)
    for chunk in CHUNKS[2:]:
        run._append("data", {"text": chunk})
    run._finish_ok(RESULT)
    later = [event async for event in following]
    text = _text([snapshot, *later])
    if from_snapshot:
        assert text == "".join(CHUNKS)
    else:  # the negative control: the snapshot's chunks come again
        assert text != "".join(CHUNKS) and text.startswith("It is It is ")
    final = later[-1]
    assert isinstance(final, TaskStatusUpdateEvent) and final.final and final.status.state is TaskState.completed
    whole = later[-2]
    assert isinstance(whole, TaskArtifactUpdateEvent) and whole.last_chunk and not whole.append
    assert whole.artifact.parts[0].root.text == "".join(CHUNKS)  # the end replaces: exact, whatever was missed


async def test_a_queued_turn_says_when_it_starts_working_and_silence_is_kept_alive() -> None:
    @dataclasses.dataclass
    class Place:
        session_id: str = "ctx-1"
        ahead: int = 1

        def position(self) -> int:
            return self.ahead

        def leave(self) -> None:
            pass

    place = Place()
    run = Run("scope#key", None, 100)
    run.place = place
    view = _view()
    following = follow_run(run, view, 0.01)
    snapshot = await anext(following)
    assert isinstance(snapshot, Task) and snapshot.status.state is TaskState.submitted
    assert await anext(following) is None  # nothing happened for a keepalive's time
    place.ahead = 0
    run._decide(replayed=False)
    working = await anext(following)
    assert isinstance(working, TaskStatusUpdateEvent) and working.status.state is TaskState.working
    run._finish_error(cancelled_problem())
    rest = [event async for event in following if event is not None]
    assert rest[-1].status.state is TaskState.canceled and rest[-1].final


def test_views_of_ended_tasks_explain_themselves() -> None:
    view = _view()
    assert view.absorb("tool_use", {"name": "x"}) == []
    view.absorb("error", {"type": "tag:other", "title": "Agent failed", "detail": "The agent failed."})
    task = view.task(history_length=0)
    assert task.status.state is TaskState.failed and task.history is None
    assert task.status.message is not None and task.status.message.parts[0].root.text == "The agent failed."
    view.problem = {}
    assert view.task().status.message.parts[0].root.text == "The task ended without an answer."
    done = _view()
    done.absorb("result", RESULT)
    assert [m.role.value for m in done.task(history_length=5).history or []] == ["agent"]
    assert done.task().metadata == {"strands_py": {"stop_reason": "end_turn", "usage": None}}
    assert wire_event(_first_frame())[0] == "data"


def _first_frame() -> Any:
    run = _run()
    run._append("data", {"text": "x"})
    return run.read(0)[0][0]


# -- tasks another server runs -------------------------------------------------------------------------------------


class _Store(InMemoryIdempotencyStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing: BaseException | None = None

    async def get(self, key: str) -> IdempotencyRecord | None:
        if self.failing is not None:
            raise self.failing
        return await super().get(key)


async def _claimed(store: InMemoryIdempotencyStore, key: str) -> IdempotencyRecord:
    record = IdempotencyRecord(
        key=key,
        state=RecordState.IN_PROGRESS,
        owner="elsewhere",
        version=new_version(),
        lease_seconds=30.0,
        expires_at=4e9,
    )
    assert await store.claim(record, 0) is None
    return record


async def _follow(store: InMemoryIdempotencyStore, registry: RunRegistry, key: str) -> Any:
    return follow_stored(IdempotencyConfig(store=store), registry, key, _view(), 1, 0.01)


async def test_a_task_elsewhere_is_working_until_its_owner_gives_it_up() -> None:
    store = _Store()
    record = await _claimed(store, "invocations#k1")
    following = await _follow(store, RunRegistry(0, 1), record.key)
    snapshot = await anext(following)
    assert isinstance(snapshot, Task) and snapshot.status.state is TaskState.working
    assert await anext(following) is None  # still running elsewhere: kept alive
    assert await store.release(record.key, "elsewhere")
    rest = [event async for event in following if event is not None]
    assert rest[-1].status.state is TaskState.failed and "resume" in rest[-1].status.message.parts[0].root.text


async def test_a_task_elsewhere_that_is_cancelled_ends_cancelled() -> None:
    store = _Store()
    record = await _claimed(store, "invocations#k2")
    following = await _follow(store, RunRegistry(0, 1), record.key)
    await anext(following)
    assert await store.complete(dataclasses.replace(record, state=RecordState.CANCELLED))
    rest = [event async for event in following if event is not None]
    assert rest[-1].status.state is TaskState.canceled and rest[-1].final


async def test_a_task_elsewhere_that_starts_here_is_followed_here() -> None:
    store = _Store()
    record = await _claimed(store, "invocations#k3")
    registry = RunRegistry(10, 60)
    following = await _follow(store, registry, record.key)
    await anext(following)
    run = Run(record.key, None, 100)
    registry.add(run)
    run._decide(replayed=False)
    run._append("data", {"text": "Hi."})
    run._finish_ok({"message": {"content": [{"text": "Hi."}]}})
    rest = [event async for event in following if event is not None]
    assert _text(rest) == "Hi." and rest[-1].status.state is TaskState.completed


async def test_a_store_outage_while_following_is_the_stream_s_error() -> None:
    store = _Store()
    record = await _claimed(store, "invocations#k4")
    following = await _follow(store, RunRegistry(0, 1), record.key)
    await anext(following)
    store.failing = IdempotencyStoreError("down")
    with pytest.raises(RpcError) as raised:
        await asyncio.wait_for(_drain(following), WAIT)
    assert raised.value.code == -32053


async def _drain(events: Any) -> None:
    async for _ in events:
        pass


async def test_a_new_follower_is_kept_alive_until_the_run_starts_and_gets_its_error_if_nothing_ran() -> None:
    waiting, refused = Run("scope#key", None, 100), Run("scope#other", None, 100)
    following = follow_started(waiting, _view(), 0.01)
    assert await anext(following) is None  # not started yet: a keepalive
    waiting._decide(replayed=False)
    waiting._finish_ok(RESULT)
    assert isinstance(await anext(following), Task)
    refused._finish_error(Problem(503, STORE_UNAVAILABLE, "Idempotency store unavailable", "down", 1))
    with pytest.raises(RpcError) as raised:
        await anext(follow_started(refused, _view(), 0.01))
    assert raised.value.code == -32053 and raised.value.body()["data"]["retry_after"] == 1
