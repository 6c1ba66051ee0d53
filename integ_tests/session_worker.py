"""Runs in separate OS processes (multiprocessing, spawn) for test_sessions.py: turns of one persisted conversation.

A process is started ahead of need with a ``Probe`` (multiprocessing events and queues the test follows it through;
spawning and importing take seconds), then given one ``Job``: a backend, a session, its turns. Each turn builds its own
Agent, as a server that builds an Agent per request does: a ``FileSessionManager`` on a directory every process
shares, or an ``S3SessionManager`` on the test's moto server, and a ``DynamoDBIdempotencyStore`` on the same server.
The model is a real ``BedrockModel`` whose boto3 client answers from a script that ties every message of a turn to
that turn's prompt: the tool is asked about the prompt, the tool's result names it, and the answer names it together
with the prompt of the turn before it, as the model was sent it. A persisted conversation therefore shows which
prompt each tool cycle and answer belongs to, and whether the model was sent the conversation as it stood (read again
under the session lock, rolled back after a crash) or a stale one.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import json
import logging
import os
import queue
import signal
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import boto3
import strands
from strands import tool
from strands.session.file_session_manager import FileSessionManager
from strands.session.repository_session_manager import RepositorySessionManager
from strands.session.s3_session_manager import S3SessionManager
from strands.types.exceptions import ConcurrencyException

from strands_py import Agent, IdempotencyLeaseLostError, SessionBusyError
from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.session import _lock as session_lock_module
from strands_py.session._conversation import _Conversation
from strands_py.session._lock import SessionLock
from strands_py.testing.bedrock import ScriptedBedrock, _last_turn_has_tool_result, _ScriptedEventStream, _text_chunks
from strands_py.types.session import SessionInvocationMode

TABLE = "agent-idempotency-sessions"
BUCKET = "strands-py-sessions"
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
AGENT_ID = "default"
WAIT = 60.0
# A warm process nobody gave a job to exits after this long (the test module kills it sooner).
IDLE_SECONDS = 600.0
# How a stored lock record's key is told from a token's (``session_lock_key``).
SESSION_KEY_MARK = "#session-"
BREAKAGES = ("no_rollback", "no_reread", "throw_waits", "own_lock_is_busy")
RETRIED = ("busy", "lease_lost")


@dataclass(frozen=True)
class Backend:
    """Where conversations and idempotency records live: ``kind`` "file" (``where`` is a directory every process
    shares) or "s3" (``where`` is a key prefix in ``BUCKET``); records always in ``TABLE`` on ``endpoint``."""

    kind: str
    endpoint: str
    where: str

    def manager(self, session_id: str) -> RepositorySessionManager:
        """A session manager of ``session_id`` (creates the session when it does not exist)."""
        if self.kind == "file":
            return FileSessionManager(session_id=session_id, storage_dir=self.where)
        return s3_manager(self.endpoint, self.where, session_id)

    def store(self) -> DynamoDBIdempotencyStore:
        """This process's idempotency store (close it when done)."""
        return DynamoDBIdempotencyStore(TABLE, boto3_session=_boto3_session(), endpoint_url=self.endpoint)


_sessions: list[boto3.Session] = []


def _boto3_session() -> boto3.Session:
    """One boto3 session per process: clients made from it share its loaded models (a new one costs 0.25 s)."""
    if not _sessions:
        _sessions.append(boto3.Session(region_name=REGION, **CREDENTIALS))
    return _sessions[0]


def s3_manager(endpoint: str, prefix: str, session_id: str) -> S3SessionManager:
    """An ``S3SessionManager`` on the moto server at ``endpoint``, on every supported strands-agents.

    Newer strands take ``endpoint_url``; older ones (1.30) do not, but botocore reads a service's endpoint from
    ``AWS_ENDPOINT_URL_S3`` when the client is created: it is set for that moment only.
    """
    session = _boto3_session()
    arguments: dict[str, Any] = {"session_id": session_id, "bucket": BUCKET, "prefix": prefix, "boto_session": session}
    if "endpoint_url" in inspect.signature(S3SessionManager.__init__).parameters:
        return S3SessionManager(**arguments, endpoint_url=endpoint)
    with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL_S3": endpoint}):
        return S3SessionManager(**arguments)


def open_session(backend: Backend, session_id: str) -> None:
    """Create the session and the agent's record, as a conversation's first request does, before processes share it.

    Building an Agent creates its record when it has none, before any lock; strands-agents 1.30's FileSessionManager
    writes every file through one fixed ``<file>.tmp`` path, so two processes creating one record at the same moment
    collide (``FileNotFoundError`` on the rename). Opening the session first keeps that race out of these tests.
    """
    strands.Agent(model=ScriptedBedrock().model(), callback_handler=None, session_manager=backend.manager(session_id))


def persisted(backend: Backend, session_id: str) -> list[Any]:
    """Every message persisted in ``session_id`` for the agent, in order."""
    manager = backend.manager(session_id)
    return [m.to_message() for m in manager.session_repository.list_messages(session_id, AGENT_ID)]


def answer_for(prompt: str, previous: str | None) -> str:
    """The scripted answer to ``prompt`` when the last prompt before it the model was sent is ``previous``."""
    return f"answer to <{prompt}> after <{previous or 'nothing'}>"


def tool_result_for(city: str) -> str:
    """What the scripted tool returns for ``city`` (the turn's prompt)."""
    return f"sunny in <{city}>"


# One turn of the scripted conversation: the prompt, the tool request about it, the tool's result, the answer.
ONE_TURN = [
    ("user", ("text",)),
    ("assistant", ("toolUse",)),
    ("user", ("toolResult",)),
    ("assistant", ("text",)),
]


def shape(messages: list[Any]) -> list[tuple[str, tuple[str, ...]]]:
    """A conversation's shape: each message's role and the kinds of its blocks (ids and timestamps ignored)."""
    return [(m["role"], tuple(sorted(k for block in m["content"] for k in block))) for m in messages]


def prompts_of(messages: list[Any]) -> list[str]:
    """The text of every user message that carries text (the prompts), in order."""
    return [b["text"] for m in messages if m["role"] == "user" for b in m["content"] if "text" in b]


def check_turns(messages: list[Any]) -> list[str]:
    """Check every turn of a persisted conversation and return its prompts, in order.

    A turn is the prompt, the tool request about that prompt, the tool's result for it, and the answer to that prompt
    saying the last prompt the model was sent before it is the previous turn's.
    """
    assert len(messages) % len(ONE_TURN) == 0, f"not whole turns: {shape(messages)}"
    prompts: list[str] = []
    for start in range(0, len(messages), len(ONE_TURN)):
        user, ask, result, answer = messages[start : start + len(ONE_TURN)]
        assert shape([user, ask, result, answer]) == ONE_TURN, f"turn at message {start}: {shape(messages)}"
        prompt = user["content"][0]["text"]
        use, outcome = ask["content"][0]["toolUse"], result["content"][0]["toolResult"]
        assert use["input"] == {"city": prompt}, f"turn at message {start} ({prompt!r}) asked about {use['input']}"
        assert outcome["toolUseId"] == use["toolUseId"], f"turn at message {start}: the tool result is another's"
        assert outcome["content"][0]["text"] == tool_result_for(prompt), f"turn at message {start}"
        assert answer["content"][0]["text"] == answer_for(prompt, prompts[-1] if prompts else None), (
            f"turn at message {start} ({prompt!r}): answered {answer['content'][0]['text']!r}"
        )
        prompts.append(prompt)
    return prompts


@dataclass(frozen=True)
class Job:
    """What one worker process does.

    Attributes:
        backend: Where the conversation and the records live.
        session_id: The conversation.
        turns: (prompt, idempotency token) of each turn, run one after the other, each by a new Agent.
        mode: ``session_invocation_mode``.
        lease_seconds: Of the token claims and the session lock.
        wait_timeout_seconds: How long a turn waits for the session (enqueue) or another owner's token.
        gated: Model calls wait for the probe's ``gate``.
        crash_in_tool: The tool says so (``in_tool``) and then blocks until the process is killed.
        build_first: The first turn's Agent is built (its conversation read, before any lock) before ``go``.
        with_tool: Turns have a tool cycle (four messages) or not (two).
        breakage: A negative control's defect, applied in this process (one of ``BREAKAGES``).
        lock_claim_delay: Seconds every claim of the session lock waits before it is sent (a slow round trip).
        retries: How many times a turn that was refused (``SessionBusyError``) or cut short (its lease lost, e.g.
            on an overloaded machine) is sent again with the same token, as a client would.
    """

    backend: Backend
    session_id: str
    turns: tuple[tuple[str, str], ...]
    mode: str = "throw"
    lease_seconds: float = 2.0
    wait_timeout_seconds: float | None = WAIT
    gated: bool = False
    crash_in_tool: bool = False
    build_first: bool = False
    with_tool: bool = True
    breakage: str | None = None
    lock_claim_delay: float = 0.0
    retries: int = 0


class Probe:
    """One worker process as the test sees it. Picklable only when the process is spawned (it is its argument).

    Queues: ``jobs`` (the one job, sent by the test), ``out`` (the report). Events: ``ready`` (the process is set up,
    and built its first Agent when asked to), ``go`` (the test lets it run its turns), ``gate`` (releases gated model
    calls), ``entered`` (a model call started), ``in_tool`` (a crashing tool was entered), ``blocked`` (a store call
    met another owner's claim that it has not yielded, of the token or of the session lock; counted in
    ``blocked_count``), ``lock_renewed`` (a session lock's lease was renewed; the test clears it).

    Times are ``time.monotonic()`` (on Linux one clock for every process of the machine). ``token_written_at`` and
    ``lock_written_at``: when this process sent the last successful write (claim, takeover, renewal) of a token claim
    and of a session lock; a waiter judges a holder gone a whole lease after its last write at the earliest.
    ``takeovers``: successful takeovers (of a token claim or a session lock); ``token_watched`` and ``lock_watched``:
    how long before its last takeover of each this process had first read the version it replaced (at least a whole
    lease; about one lease plus a poll for a dead holder). ``model_started_at``: when the first model call started.
    ``turns_done``: turns finished, whatever their outcome. ``diagnostics``: a directory for the process's
    ``log-<pid>.txt`` (strands_py debug log) and ``stacks-<pid>.txt``.
    """

    def __init__(self, ctx: Any, diagnostics: str) -> None:
        self.diagnostics = diagnostics
        self.jobs, self.out = ctx.Queue(), ctx.Queue()
        self.ready, self.go, self.gate, self.entered, self.in_tool, self.blocked = (ctx.Event() for _ in range(6))
        self.lock_renewed = ctx.Event()
        self.token_written_at, self.lock_written_at = ctx.Value("d", 0.0), ctx.Value("d", 0.0)
        self.blocked_count = ctx.Value("i", 0)
        self.takeovers = ctx.Value("i", 0)
        self.token_watched, self.lock_watched = ctx.Value("d", 0.0), ctx.Value("d", 0.0)
        self.model_started_at = ctx.Value("d", 0.0)
        self.turns_done = ctx.Value("i", 0)


class WatchedStore(IdempotencyStore):
    """Forwards to ``inner``; tells the probe whenever a claim or a read meets another owner's claim (not yielded),
    when this process wrote its own claims, and when a session lock's lease was renewed. ``lock_claim_delay`` delays
    every claim of a session lock (a slow round trip). Journals are not forwarded (``supports_journal`` stays False):
    a takeover here runs the turn again, as on a store without journals."""

    def __init__(self, inner: IdempotencyStore, probe: Probe | None, lock_claim_delay: float = 0.0) -> None:
        self.inner = inner
        self.max_result_bytes = inner.max_result_bytes
        self.probe = probe
        self.lock_claim_delay = lock_claim_delay
        self.owners: set[str] = set()
        self.first_seen: dict[str, float] = {}  # version of another owner's claim -> when we first read it

    def _met(self, record: IdempotencyRecord | None) -> None:
        if record is not None and record.state is RecordState.IN_PROGRESS and record.owner not in self.owners:
            self.first_seen.setdefault(record.version, time.monotonic())
        if (
            self.probe is not None
            and record is not None
            and record.state is RecordState.IN_PROGRESS
            and record.owner not in self.owners
            and not record.yielded
        ):
            with self.probe.blocked_count.get_lock():
                self.probe.blocked_count.value += 1
            self.probe.blocked.set()

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        self.owners.add(record.owner)
        if self.lock_claim_delay and SESSION_KEY_MARK in record.key:
            await asyncio.sleep(self.lock_claim_delay)  # latency injected, not a synchronisation
        sent = time.monotonic()
        existing = await self.inner.claim(record, now)
        self._met(existing)
        if existing is None:
            self._wrote(record.key, sent)
        return existing

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        self.owners.add(record.owner)
        sent = time.monotonic()
        won = await self.inner.take_over(record, version)
        if won and self.probe is not None:
            self._wrote(record.key, sent)
            with self.probe.takeovers.get_lock():
                self.probe.takeovers.value += 1
            watched = self.probe.lock_watched if SESSION_KEY_MARK in record.key else self.probe.token_watched
            watched.value = sent - self.first_seen.get(version, sent)
        return won

    def _wrote(self, key: str, sent: float) -> None:
        if self.probe is not None:
            held = self.probe.lock_written_at if SESSION_KEY_MARK in key else self.probe.token_written_at
            held.value = sent

    async def get(self, key: str) -> IdempotencyRecord | None:
        record = await self.inner.get(key)
        self._met(record)
        return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        return await self.inner.complete(record)

    async def release(self, key: str, owner: str) -> bool:
        return await self.inner.release(key, owner)

    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        sent = time.monotonic()
        renewed = await self.inner.renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )
        if renewed:
            self._wrote(key, sent)
            if self.probe is not None and SESSION_KEY_MARK in key:
                self.probe.lock_renewed.set()
        return renewed


def _tool_use_chunks(tool_use_id: str, city: str) -> list[dict[str, Any]]:
    return [
        {"messageStart": {"role": "assistant"}},
        {
            "contentBlockStart": {
                "start": {"toolUse": {"toolUseId": tool_use_id, "name": "lookup_weather"}},
                "contentBlockIndex": 0,
            }
        },
        {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps({"city": city})}}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": {"inputTokens": 20, "outputTokens": 8, "totalTokens": 28}, "metrics": {"latencyMs": 1}}},
    ]


def _prompts(messages: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The turn's prompt (the last user message with text) and the prompt before it, if the model was sent one."""
    prompts = [
        block["text"]
        for message in messages
        if message.get("role") == "user"
        for block in message.get("content", [])
        if "text" in block
    ]
    assert prompts, "the model was sent no prompt"
    return prompts[-1], prompts[-2] if len(prompts) > 1 else None


class TurnScript(ScriptedBedrock):
    """A ``ScriptedBedrock`` whose tool request and answer name the turn's prompt (see the module docstring)."""

    def __init__(self, job: Job, probe: Probe | None) -> None:
        gated = probe is not None and job.gated
        super().__init__(
            gate=probe.gate if gated and probe is not None else None,
            entered=probe.entered if probe is not None else None,
            with_tool=job.with_tool,
            gate_timeout=WAIT,
        )
        self.job = job
        self.probe = probe

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        with self._mutex:
            self.model_calls += 1
            call_number = self.model_calls
        probe = self.probe
        if probe is not None and probe.model_started_at.value == 0.0:
            probe.model_started_at.value = time.monotonic()
        self.entered.set()
        if self.gate is not None and not self.gate.wait(self.gate_timeout):
            raise TimeoutError(f"stub model gate stayed closed for {self.gate_timeout}s")
        messages = request.get("messages", [])
        prompt, previous = _prompts(messages)
        if self.with_tool and not _last_turn_has_tool_result(messages):
            tool_use_id = f"tooluse-{os.getpid()}-{call_number}"
            return {"stream": _ScriptedEventStream(_tool_use_chunks(tool_use_id, prompt))}
        return {"stream": _ScriptedEventStream(_text_chunks(answer_for(prompt, previous)))}

    def tools(self) -> list[Any]:
        script = self

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: The city.
            """
            if script.job.crash_in_tool and script.probe is not None:
                script.probe.in_tool.set()
                # Blocks like a tool stuck on a slow service, until the test kills this process (bounded anyway).
                threading.Event().wait(WAIT)
                raise TimeoutError("the test never killed this process")
            with script._mutex:
                script.tool_calls += 1
            return tool_result_for(city)

        return [lookup_weather]


def build_agent(job: Job, store: IdempotencyStore, script: TurnScript, model: Any) -> Agent:
    """One request's Agent: its own session manager (the conversation is restored now, before any lock)."""
    return Agent(
        model=model,
        tools=script.tools(),
        callback_handler=None,
        session_manager=job.backend.manager(job.session_id),
        idempotency=IdempotencyConfig(
            store=store,
            lease_seconds=job.lease_seconds,
            wait_timeout_seconds=job.wait_timeout_seconds,
            session_invocation_mode=job.mode,
        ),
    )


def _nothing(*_: Any) -> None:
    return None


def _reload_only(conversation: _Conversation, checkpoint: str) -> None:
    conversation.reload()


@contextlib.contextmanager
def broken(breakage: str | None) -> Iterator[None]:
    """A negative control's defect, for the duration of the job."""
    if breakage is None:
        yield
        return
    assert breakage in BREAKAGES, breakage
    patch: Any
    if breakage == "no_rollback":
        patch = mock.patch.object(_Conversation, "rollback", _reload_only)
    elif breakage == "no_reread":
        patch = mock.patch.object(_Conversation, "reload", _nothing)
    elif breakage == "own_lock_is_busy":  # the lock of the request's own dead run counts as another request's
        patch = mock.patch.object(session_lock_module, "token_of", _nothing)
    else:  # "throw_waits": a busy session is waited for although the mode says throw
        acquire = SessionLock.acquire

        async def waits(self: SessionLock, mode: SessionInvocationMode, *args: Any, **kwargs: Any) -> Any:
            return await acquire(self, SessionInvocationMode.ENQUEUE, *args, **kwargs)

        patch = mock.patch.object(SessionLock, "acquire", waits)
    with patch:
        yield


def _turn(agent: Agent, prompt: str, token: str) -> dict[str, Any]:
    report: dict[str, Any] = {"prompt": prompt, "token": token, "started": time.monotonic()}
    try:
        result = agent(prompt, idempotency_token=token)
    except SessionBusyError as e:
        report.update(outcome="busy", error=repr(e), concurrency=isinstance(e, ConcurrencyException))
    except IdempotencyLeaseLostError as e:
        report.update(outcome="lease_lost", error=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        report.update(outcome="error", error=f"{type(e).__name__}: {e}")
    else:
        report.update(outcome="ok", text=str(result).strip(), replayed=isinstance(result, ReplayedAgentResult))
    report["ended"] = time.monotonic()
    return report


def turns(job: Job, probe: Probe | None = None, records: IdempotencyStore | None = None) -> dict[str, Any]:
    """Run ``job``'s turns in this process (after ``probe.go`` when there is a probe); returns the report.

    ``records``: the idempotency store to use (left open), instead of a DynamoDB store of the job's backend (closed).
    """
    with broken(job.breakage):
        store = WatchedStore(records if records is not None else job.backend.store(), probe, job.lock_claim_delay)
        script = TurnScript(job, probe)
        # One model for the process, as a server shares one client: a boto3 client per request costs a quarter second.
        model = script.model()
        try:
            first = build_agent(job, store, script, model) if job.build_first else None
            if probe is not None:
                probe.ready.set()
                if not probe.go.wait(WAIT):
                    raise TimeoutError("the test never said go")
            reports = []
            for index, (prompt, token) in enumerate(job.turns):
                agent = first if index == 0 and first is not None else build_agent(job, store, script, model)
                report = _turn(agent, prompt, token)
                failed: list[str] = []
                while report["outcome"] in RETRIED and len(failed) < job.retries:
                    # What a client does with a 409 or a run cut short: the same request again, same token.
                    failed.append(report["error"])
                    report = _turn(build_agent(job, store, script, model), prompt, token)
                report["retried"] = failed
                reports.append(report)
                if probe is not None:
                    probe.turns_done.value += 1
        finally:
            if records is None:
                assert isinstance(store.inner, DynamoDBIdempotencyStore)
                store.inner.close()
    return {
        "pid": os.getpid(),
        "turns": reports,
        "model_calls": script.model_calls,
        "tool_calls": script.tool_calls,
        "blocked": probe.blocked_count.value if probe is not None else 0,
    }


def _write_suspended(file: Any) -> None:
    """Where every suspended coroutine and async generator of this process waits (the awaits a thread dump misses)."""
    print("\nsuspended coroutines and async generators:", file=file)
    for thing in gc.get_objects():
        if isinstance(thing, types.CoroutineType | types.AsyncGeneratorType):
            frame = getattr(thing, "cr_frame", None) or getattr(thing, "ag_frame", None)
            if frame is not None:
                print(f"  {thing.__qualname__} at {frame.f_code.co_filename}:{frame.f_lineno}", file=file)
    file.flush()


def serve(probe: Probe) -> None:
    """Process entry point: wait for one job, run it, and put its report (or what stopped it) on ``probe.out``.

    The strands_py debug log goes to ``log-<pid>.txt`` in ``probe.diagnostics``; SIGUSR1 writes every thread's
    stack to ``stacks-<pid>.txt`` there (the test sends it to a process that does not report in time).
    """
    pid = os.getpid()
    handler = logging.FileHandler(os.path.join(probe.diagnostics, f"log-{pid}.txt"))
    handler.setFormatter(logging.Formatter("%(created).3f %(threadName)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("strands_py").addHandler(handler)
    logging.getLogger("strands_py").setLevel(logging.DEBUG)
    stacks = open(os.path.join(probe.diagnostics, f"stacks-{pid}.txt"), "w")  # noqa: SIM115 - open until exit
    # faulthandler writes the threads' stacks at once, then chains to the Python handler (run by the main thread).
    signal.signal(signal.SIGUSR1, lambda *_: _write_suspended(stacks))
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True, chain=True)
    try:
        job = probe.jobs.get(timeout=IDLE_SECONDS)
    except queue.Empty:
        return
    try:
        report = turns(job, probe)
    except BaseException as e:  # noqa: BLE001 - the test must hear about it, not wait for a report
        probe.out.put({"pid": os.getpid(), "crashed": f"{type(e).__name__}: {e}"})
        raise
    probe.out.put(report)
