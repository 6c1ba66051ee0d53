"""The A2A server across processes: the real a2a-sdk client against two ``A2AApp`` processes sharing a redis-server.

One server pair for the module (``a2a_worker.py``: uvicorn on 127.0.0.1, contexts as ``FileSessionManager``
conversations in enqueue mode). Every model call is written to a ledger with the pid that paid it, so each test
counts the runs, and orders them: a retried ``message/send`` runs once (with a new messageId it runs again: the
negative control); a ``message/stream`` dropped mid-answer is followed by ``tasks/resubscribe`` on the other server
(the stored answer once, no chunk again) and on its own server (live, from the chunk after the snapshot); two contexts
run at once while a second message of one context waits for the first, across servers; a cancel on one server stops
the run on the other; a messageId reused with another message is the ``-32050`` error on either server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import free_port, running_redis
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientJSONRPCError
from a2a.types import (
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskIdParams,
    TaskQueryParams,
    TaskState,
    TaskStatusUpdateEvent,
    TextPart,
)

from strands_py.a2a import MESSAGE_ID_MISMATCH
from strands_py.http._demo import DEMO_ANSWER, words

WORKER = str(Path(__file__).with_name("a2a_worker.py"))
WAIT = 30.0
HOLD_AT = 4  # held answers stop before their 5th word
LEASE_SECONDS = 6.0  # heartbeats every 2 s: a cancel reaches its owner soon, a loaded machine keeps its leases


class Servers:
    """Two ``a2a_worker.py`` processes (``a`` and ``b``), their ledger and the files that release held answers."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.ledger = tmp / "ledger"
        self.go = tmp / "go"
        self.go.mkdir()
        self.urls: dict[str, str] = {}
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str) -> None:
        """Start server ``name`` (``ready`` waits until it answers)."""
        port = free_port()
        config = {
            "redis": self.redis_url,
            "ledger": str(self.ledger),
            "go": str(self.go),
            "sessions": str(self.tmp / "sessions"),
            "port": port,
            "lease_seconds": LEASE_SECONDS,
            "hold_at_word": HOLD_AT,
        }
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        self.processes[name] = subprocess.Popen(
            [sys.executable, WORKER, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.urls[name] = f"http://127.0.0.1:{port}"

    def ready(self, name: str) -> None:
        """Wait until server ``name`` serves its agent card."""
        process, url = self.processes[name], self.urls[name]
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if httpx.get(f"{url}/.well-known/agent-card.json", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stderr.read() if process.poll() is not None and process.stderr else ""
                raise AssertionError(f"server {name} did not start: {output}")
            time.sleep(0.05)  # polling a port: bounded above, not a synchronisation

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)

    def lines(self) -> list[tuple[int, str, str]]:
        """The ledger: ``(pid, what, name)`` per line, in the order written."""
        if not self.ledger.exists():
            return []
        return [
            (int(pid), what, name)
            for pid, what, name in (line.split() for line in self.ledger.read_text().splitlines())
        ]

    def models(self, name: str) -> list[int]:
        """The pids of the model calls of message ``name``, in order."""
        return [pid for pid, what, of in self.lines() if what == "model" and of == name]

    def pid(self, server: str) -> int:
        return self.processes[server].pid

    async def until(self, what: str, name: str) -> None:
        """Wait until the ledger has ``what name`` (a server wrote it)."""
        deadline = time.monotonic() + WAIT
        while not any(w == what and n == name for _, w, n in self.lines()):
            assert time.monotonic() < deadline, f"never {what} {name}: {self.lines()}"
            await asyncio.sleep(0.02)  # reading a file another process appends to: the deadline bounds the wait

    def release(self, name: str) -> None:
        (self.go / name).touch()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with running_redis() as redis:
        pair = Servers(tmp_path_factory.mktemp("a2a"), redis.url)
        try:
            for name in ("a", "b"):  # started together, so that their imports overlap
                pair.start(name)
            for name in ("a", "b"):
                pair.ready(name)
            yield pair
        finally:
            pair.stop()


@contextlib.asynccontextmanager
async def connect(url: str, *, streaming: bool = True) -> AsyncIterator[Client]:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        client = await ClientFactory.connect(url, client_config=ClientConfig(httpx_client=http, streaming=streaming))
        yield client


def unique(name: str) -> str:
    """A name for a held message, new at every run of a test (``hatch run stress`` repeats them on one server pair)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def message(text: str, *, context_id: str | None = None, message_id: str | None = None) -> Message:
    return Message(
        role=Role.user,
        parts=[Part(root=TextPart(text=text))],
        message_id=message_id or str(uuid.uuid4()),
        context_id=context_id,
    )


async def send(url: str, sent: Message) -> Task:
    """``message/send`` (blocking): the task it answers."""
    async with connect(url, streaming=False) as client:
        events = [event async for event in client.send_message(sent)]
    assert len(events) == 1 and isinstance(events[0], tuple)
    return events[0][0]


def text_of(artifact_holder: Task | TaskArtifactUpdateEvent) -> str:
    artifacts = artifact_holder.artifacts if isinstance(artifact_holder, Task) else [artifact_holder.artifact]
    return "".join(
        part.root.text for artifact in artifacts or [] for part in artifact.parts if part.root.kind == "text"
    )


async def snapshot(events: AsyncIterator[Any]) -> Task:
    """The first event of a stream: the task as it stood (a copy: the SDK goes on updating its task in place)."""
    task, update = await anext(events)
    assert update is None
    return task.model_copy(deep=True)


async def collect(events: AsyncIterator[Any]) -> list[Any]:
    """The updates of a stream after its first event (the SDK's ``(task, update)`` pairs' updates)."""
    return [update async for _, update in events]


ANSWER = "".join(words(DEMO_ANSWER))


# -- a retried message runs once -----------------------------------------------------------------------------------


@pytest.mark.racing
@pytest.mark.parametrize("same_message_id", [True, False], ids=["same-messageId", "new-messageId-control"])
async def test_a_retried_message_send_runs_once_on_any_server(servers: Servers, same_message_id: bool) -> None:
    first = message("What is the weather in Paris?")
    name = first.message_id

    sent = [first] + [first if same_message_id else message("What is the weather in Paris?") for _ in range(4)]
    task = await send(servers.urls["a"], first)
    retries = await asyncio.gather(*(send(servers.urls[s], m) for s, m in zip("abba", sent[1:], strict=True)))
    assert task.status.state is TaskState.completed and text_of(task) == ANSWER
    assert all(r.status.state is TaskState.completed and text_of(r) == ANSWER for r in retries)
    paid = sum(len(servers.models(m.message_id)) for m in {m.message_id: m for m in sent}.values())
    if same_message_id:
        assert {r.id for r in retries} == {task.id} and servers.models(name) == [servers.pid("a")] * 2
    else:  # the negative control: every new messageId is a new task, and the agent runs for each
        assert len({r.id for r in retries} | {task.id}) == 5 and paid == 10


# -- a dropped stream, resubscribed -------------------------------------------------------------------------------


@pytest.mark.racing
async def test_a_dropped_stream_is_resubscribed_on_the_other_server_and_on_its_own(servers: Servers) -> None:
    dropped = unique("dropped")
    sent = message(f"hold:{dropped} What is the weather in Paris?")
    chunks: list[str] = []
    async with connect(servers.urls["a"]) as client:
        async for task, update in client.send_message(sent):
            task_id = task.id
            if isinstance(update, TaskArtifactUpdateEvent):
                chunks.append(text_of(update))
            if len(chunks) == HOLD_AT:
                break  # the client goes away mid-answer: its stream is closed, the run carries on
    await servers.until("held", dropped)
    async with connect(servers.urls["b"]) as elsewhere, connect(servers.urls["a"]) as here:
        on_b = elsewhere.resubscribe(TaskIdParams(id=task_id))
        on_a = here.resubscribe(TaskIdParams(id=task_id))
        snapshot_b = await snapshot(on_b)
        snapshot_a = await snapshot(on_a)
        servers.release(dropped)
        rest_b, rest_a = await asyncio.gather(collect(on_b), collect(on_a))
        got = await elsewhere.get_task(TaskQueryParams(id=task_id))

    assert "".join(chunks) == "".join(words(DEMO_ANSWER)[:HOLD_AT])
    # The other server knows the task from the store: working, then the stored answer once, whole, and the end.
    assert snapshot_b.status.state is TaskState.working and not snapshot_b.artifacts
    [answer_b, end_b] = rest_b
    assert isinstance(answer_b, TaskArtifactUpdateEvent) and answer_b.last_chunk and not answer_b.append
    assert text_of(answer_b) == ANSWER
    assert isinstance(end_b, TaskStatusUpdateEvent) and end_b.final and end_b.status.state is TaskState.completed
    # Its own server follows the run live: the text so far in the snapshot, then each later chunk once.
    assert snapshot_a.status.state is TaskState.working and text_of(snapshot_a) == "".join(chunks)
    appended = [text_of(u) for u in rest_a if isinstance(u, TaskArtifactUpdateEvent) and not u.last_chunk]
    assert text_of(snapshot_a) + "".join(appended) == ANSWER
    assert rest_a[-1].final and rest_a[-1].status.state is TaskState.completed
    assert got.status.state is TaskState.completed and text_of(got) == ANSWER
    assert servers.models(dropped) == [servers.pid("a")] * 2  # one run, on the server it was sent to


# -- contexts ------------------------------------------------------------------------------------------------------


@pytest.mark.racing
async def test_two_contexts_run_at_once_while_one_context_serialises_its_messages(servers: Servers) -> None:
    one, two = f"ctx-{uuid.uuid4()}", f"ctx-{uuid.uuid4()}"
    one_1, two_1, one_2 = unique("one-1"), unique("two-1"), unique("one-2")
    first = asyncio.ensure_future(send(servers.urls["a"], message(f"hold:{one_1} Weather?", context_id=one)))
    other = asyncio.ensure_future(send(servers.urls["a"], message(f"hold:{two_1} Weather?", context_id=two)))
    await servers.until("held", one_1)
    await servers.until("held", two_1)  # both contexts' turns are running at once
    async with connect(servers.urls["b"]) as client:
        stream = client.send_message(message(f"hold:{one_2} And tomorrow?", context_id=one))
        queued = await snapshot(stream)
        assert queued.status.state is TaskState.submitted  # on the other server, behind the running turn
        assert servers.models(one_2) == []
        for name in (one_1, two_1, one_2):
            servers.release(name)
        rest = await collect(stream)
    done = await asyncio.gather(first, other)
    assert all(task.status.state is TaskState.completed for task in done)
    assert rest[-1].final and rest[-1].status.state is TaskState.completed
    assert any(isinstance(u, TaskStatusUpdateEvent) and u.status.state is TaskState.working for u in rest)
    lines = [(what, name) for _, what, name in servers.lines()]
    # The second turn of context one made its first model call after the first turn's last.
    last_of_first = max(i for i, line in enumerate(lines) if line == ("model", one_1))
    assert lines.index(("model", one_2)) > last_of_first
    assert servers.models(one_2) == [servers.pid("b")] * 2


# -- cancel --------------------------------------------------------------------------------------------------------


@pytest.mark.racing
async def test_a_cancel_on_one_server_stops_the_run_on_the_other(servers: Servers) -> None:
    cancelled = unique("cancelled")
    sent = message(f"hold:{cancelled} Weather?")
    async with connect(servers.urls["a"]) as client:
        stream = client.send_message(sent)
        task_id = (await anext(stream))[0].id
        await servers.until("held", cancelled)
        async with connect(servers.urls["b"]) as elsewhere:
            answered = await elsewhere.cancel_task(TaskIdParams(id=task_id))
        rest = await collect(stream)
    assert answered.status.state is TaskState.canceled, (answered, servers.lines())
    await servers.until("released", cancelled)  # released by the cancel: the go file was never created
    assert not (servers.go / cancelled).exists()
    assert rest[-1].final and rest[-1].status.state is TaskState.canceled, (rest, servers.lines())
    async with connect(servers.urls["b"]) as client:
        got = await client.get_task(TaskQueryParams(id=task_id))
    assert got.status.state is TaskState.canceled and not got.artifacts, (got, servers.lines())
    assert servers.models(cancelled) == [servers.pid("a")] * 2  # the answer's call was cut short, not finished
    # The message, sent again, runs afresh (nothing was stored).
    servers.release(cancelled)
    again = await send(servers.urls["b"], sent)
    assert again.status.state is TaskState.completed and text_of(again) == ANSWER, (again, servers.lines())
    assert servers.models(cancelled) == [servers.pid("a")] * 2 + [servers.pid("b")] * 2


# -- mismatch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["a", "b"], ids=["same-server", "other-server"])
async def test_a_message_id_reused_with_another_message_is_an_error(servers: Servers, server: str) -> None:
    sent = message("What is the weather in Paris?")
    await send(servers.urls["a"], sent)
    changed = [
        message("What is the weather in Rome?", message_id=sent.message_id),
        message("What is the weather in Paris?", message_id=sent.message_id, context_id="another"),
    ]
    for other in changed:
        with pytest.raises(A2AClientJSONRPCError) as raised:
            await send(servers.urls[server], other)
        assert raised.value.error.code == MESSAGE_ID_MISMATCH
        assert "messageId" in raised.value.error.message
    assert servers.models(sent.message_id) == [servers.pid("a")] * 2  # nothing else ran
