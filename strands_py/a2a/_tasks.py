"""A run as A2A sees it: a ``Task`` snapshot, then the status and artifact updates that follow it, without repeats.

A follower (a ``message/stream``, its retry, a ``tasks/resubscribe``) reads the run's recorded events once: everything
recorded so far becomes the snapshot (the text so far in the ``answer`` artifact), everything after it an update, so
no chunk is ever sent twice to one follower. Text chunks are appended to the ``answer`` artifact; the end replaces it
with the whole answer (``append: false``, ``lastChunk: true``), so a client that missed chunks (a follower on a
server that only knows the stored result, a run past ``max_buffered_events``) still ends with the exact answer; then
the final status. Snapshots keep the conversation in ``history`` (the user's message where this server knows it, then
the answer) and say what happened to a task that did not complete in ``status.message``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncGenerator
from typing import Any

from a2a.types import Message, Task, TaskArtifactUpdateEvent, TaskState, TaskStatus, TaskStatusUpdateEvent

from ..http._problems import ABORTED, CANCELLED, Problem
from ..http._protocol import ProblemError
from ..http._registry import RunRegistry
from ..http._runs import Run
from ..http._stored import stored_run
from ..http._wire import WireEvent
from ..idempotency.config import IdempotencyConfig
from ._convert import agent_message, answer_artifact, answer_text, text_artifact
from ._errors import ends_the_task, error_for

A2AEvent = Task | TaskStatusUpdateEvent | TaskArtifactUpdateEvent

# The states a task ends in (its stream's last status is final).
ENDED = frozenset({TaskState.completed, TaskState.input_required, TaskState.failed, TaskState.canceled})

METADATA_KEY = "strands_py"

# Run-control statuses (``strands_py.http._control``) as task states.
STATES = {
    "queued": TaskState.submitted,
    "running": TaskState.working,
    "cancelling": TaskState.canceled,  # marked: no result can be stored any more, whatever the owner does next
    "completed": TaskState.completed,
    "failed": TaskState.failed,
    "cancelled": TaskState.canceled,
}


def interrupted_problem(retry_after: int) -> Problem:
    """The owner of the task stopped without a result (a crash, a shutdown): the message, sent again, resumes it."""
    return Problem(
        503,
        ABORTED,
        "Task interrupted",
        "The server running this task stopped without a result; send the message again (same messageId) to resume it.",
        retry_after,
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wire_event(event: WireEvent) -> tuple[str, dict[str, Any]]:
    """The name and data of a recorded event (its SSE frame's one ``data:`` line)."""
    data = event.frame.partition(b"\ndata: ")[2]
    return event.name, json.loads(data)


class TaskView:
    """What one follower knows of a task: the text so far, the result or the problem, and whether it waits in line.

    Not thread-safe: one follower's.
    """

    def __init__(self, task_id: str, context_id: str, digest: str, user_message: Message | None) -> None:
        """A task nothing is known of yet; ``user_message``: the message that started it, when known here."""
        self.task_id = task_id
        self.context_id = context_id
        self._digest = digest[:32]
        self.user_message = user_message
        self.chunks: list[str] = []
        self.result: dict[str, Any] | None = None
        self.problem: dict[str, Any] | None = None
        self.queued = False

    @property
    def state(self) -> TaskState:
        """The task's state as far as this view knows."""
        if self.result is not None:
            # A turn that stopped for a human: answered by the next message of its context (interrupt_responses).
            return TaskState.input_required if self.result.get("stop_reason") == "interrupt" else TaskState.completed
        if self.problem is not None:
            return TaskState.canceled if self.problem.get("type") == CANCELLED else TaskState.failed
        return TaskState.submitted if self.queued else TaskState.working

    def absorb(self, name: str, data: dict[str, Any]) -> list[A2AEvent]:
        """Take one recorded event of the run in; the updates it makes (none for what A2A does not show)."""
        if name == "data" and isinstance(data.get("text"), str):
            append = bool(self.chunks)
            self.chunks.append(data["text"])
            artifact = text_artifact(data["text"])
            return [self._artifact_event(artifact, append=append, last=False)]
        if name == "result":
            self.result = data
            return [self._artifact_event(answer_artifact(data), append=False, last=True), self.status_event()]
        if name == "error":
            self.problem = data
            return [self.status_event()]
        return []

    def end_with(self, problem: Problem) -> TaskStatusUpdateEvent:
        """The final update of a task that ended with ``problem`` (cancelled, or interrupted)."""
        self.problem = problem.body()
        return self.status_event()

    def _artifact_event(self, artifact: Any, *, append: bool, last: bool) -> TaskArtifactUpdateEvent:
        return TaskArtifactUpdateEvent(
            task_id=self.task_id, context_id=self.context_id, artifact=artifact, append=append, last_chunk=last
        )

    def status_event(self) -> TaskStatusUpdateEvent:
        """The update of the task's status now (final once it completed, failed or was cancelled)."""
        state = self.state
        final = state in ENDED
        message = self._answer() if self.result is not None else self._explanation()
        return TaskStatusUpdateEvent(
            task_id=self.task_id,
            context_id=self.context_id,
            status=TaskStatus(state=state, message=message, timestamp=_now()),
            final=final,
            metadata=self._metadata(),
        )

    def task(self, history_length: int | None = None) -> Task:
        """The task as it stands (``history_length``: keep that many of the latest messages of its history)."""
        history = [self.user_message] if self.user_message is not None else []
        artifacts = None
        if self.result is not None:
            history.append(self._answer())
            artifacts = [answer_artifact(self.result)]
        elif self.chunks:
            artifacts = [text_artifact("".join(self.chunks))]
        if history_length is not None:
            history = history[-history_length:] if history_length > 0 else []
        return Task(
            id=self.task_id,
            context_id=self.context_id,
            status=TaskStatus(state=self.state, message=self._status_message(), timestamp=_now()),
            history=history or None,
            artifacts=artifacts,
            metadata=self._metadata(),
        )

    def _answer(self) -> Message:
        assert self.result is not None
        return agent_message(answer_text(self.result), self.task_id, self.context_id, f"answer-{self._digest}")

    def _status_message(self) -> Message | None:
        """A snapshot's status message: the question of a task that waits for a human, or what ended it."""
        return self._answer() if self.state is TaskState.input_required else self._explanation()

    def _explanation(self) -> Message | None:
        """What happened to a task that ended without an answer (the problem's detail)."""
        if self.problem is None or self.result is not None:
            return None
        detail = str(self.problem.get("detail") or self.problem.get("title") or "The task ended without an answer.")
        return agent_message(detail, self.task_id, self.context_id, f"status-{self._digest}")

    def _metadata(self) -> dict[str, Any] | None:
        if self.result is not None:
            result = self.result
            metadata = {"stop_reason": result.get("stop_reason"), "usage": result.get("usage")}
            if result.get("interrupts"):
                metadata["interrupts"] = result["interrupts"]
            return {METADATA_KEY: metadata}
        if self.problem is not None:
            return {METADATA_KEY: {"problem": self.problem}}
        return None


def absorb_all(view: TaskView, run: Run) -> int:
    """Take every event the run recorded so far into ``view`` (the snapshot's part); the index to follow from."""
    events, _, _ = run.read(0)
    view.queued = run.phase == "queued"
    for event in events:
        view.absorb(*wire_event(event))
    return len(events)


async def follow_run(run: Run, view: TaskView, keepalive_seconds: float) -> AsyncGenerator[A2AEvent | None, None]:
    """The task's snapshot, then its updates to the end of the run; None every ``keepalive_seconds`` of silence.

    Closing the iterator stops following only; the run carries on. Cancellation: as closing it.
    """
    start = absorb_all(view, run)
    yield view.task()
    async for event in updates(run, view, start, keepalive_seconds):
        yield event


async def follow_started(run: Run, view: TaskView, keepalive_seconds: float) -> AsyncGenerator[A2AEvent | None, None]:
    """A new follower's stream: keepalives until the run has started or queued, then ``follow_run``.

    The stream is open while the run decides (say, a retry that follows the run of another server until it ends):
    a client sees a keepalive every ``keepalive_seconds`` rather than nothing.

    Raises:
        RpcError: Nothing ran (a mismatch the store saw, a context busy on another server, the store down): the
            stream's only event is the error.
    """
    while True:
        version = run.state()
        if run.decided or run.phase == "queued":
            break
        if not await run.changed(version, keepalive_seconds):
            yield None
    problem = run.problem
    if run.failed_before_start and problem is not None and not ends_the_task(problem):
        raise error_for(problem)
    async for event in follow_run(run, view, keepalive_seconds):
        yield event


async def updates(
    run: Run, view: TaskView, start: int, keepalive_seconds: float
) -> AsyncGenerator[A2AEvent | None, None]:
    """The updates of ``run`` from its recorded event ``start`` to its end; None every ``keepalive_seconds`` of silence.

    A turn that waited in its context's line says when it starts working.
    """
    while True:
        events, version, finished = run.read(start)
        if view.queued and not finished and run.phase == "running":
            view.queued = False
            yield view.status_event()
        for event in events:
            for update in view.absorb(*wire_event(event)):
                yield update
        start += len(events)
        if finished and not events:
            return
        if not events and not await run.changed(version, keepalive_seconds):
            yield None


async def follow_stored(
    config: IdempotencyConfig,
    registry: RunRegistry,
    key: str,
    view: TaskView,
    retry_after: int,
    keepalive_seconds: float,
) -> AsyncGenerator[A2AEvent | None, None]:
    """A task another server runs: its snapshot (working), then, once the store says how it ended, the end.

    The store is polled (``stored_run``: capped backoff) until the record completes (the stored answer, as one
    artifact: nothing repeats what the owner streamed to anyone), is cancelled, is given up by its owner (the
    task ``failed``, resumable by sending the message again), or a run of it starts on this server (followed from
    its first event). Cancellation: stops polling, nothing is held.

    Raises:
        RpcError: The wait ended otherwise (the store unavailable, the task still running past the wait deadline).
    """
    yield view.task()
    waiting = asyncio.ensure_future(stored_run(config, registry, key, retry_after))
    try:
        while not (await asyncio.wait([waiting], timeout=keepalive_seconds))[0]:
            yield None
    finally:
        waiting.cancel()  # done already, or the follower went away: stop polling
    try:
        run = waiting.result()
    except ProblemError as e:
        if e.problem.type == CANCELLED:
            yield view.end_with(e.problem)
            return
        if e.problem.status == 404:  # its owner stopped without a result (the record lapsed or was yielded)
            yield view.end_with(interrupted_problem(retry_after))
            return
        raise error_for(e.problem) from e
    async for event in updates(run, view, 0, keepalive_seconds):
        yield event
