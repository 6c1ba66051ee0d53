"""Runs in a separate OS process (multiprocessing, spawn) for test_clock_skew.py: an agent whose wall clock is off.

A process is spawned with its clock offset (``serve(offset, probe)``) and moves ``time.time`` and ``time.time_ns`` by
it *before* strands or strands_py is imported: this module imports neither (nothing but the standard library), and
``serve`` imports the agent side (``skew_roles``) only once the clock is moved, so no module can have kept a reference
to the true clock. Then it takes one job (a ``Role``: owner or waiter of a token or a session) and reports.

``datetime.now`` is not moved: strands_py never reads it (its only wall clock is ``time.time()``, for ``expires_at``);
strands reads it for the timestamps of persisted messages, and botocore to sign requests, and neither decides
anything here.

The in-memory store lives in one process, so its test runs owner and waiter on two threads of the test process
instead, each with an offset of its own (``offset``, a context variable: the tasks of a thread's event loop and
``asyncio.to_thread`` inherit it). ``time.monotonic`` is never moved: it is the clock a waiter judges by.
"""

from __future__ import annotations

import contextvars
import faulthandler
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

WAIT = 60.0
# A warm process nobody gave a job to exits after this long (the test module kills it sooner).
IDLE_SECONDS = 600.0
# Longer than any job takes, shorter than the test waits for a report.
HANG_SECONDS = 45.0
# Room for a record version (``new_version()``: 16 hex digits and a counter).
VERSION_BYTES = 64

_true_time = time.time
_true_time_ns = time.time_ns
_process_offset = 0.0
_thread_offset: contextvars.ContextVar[float | None] = contextvars.ContextVar("clock_offset", default=None)


def true_time() -> float:
    """The machine's wall clock, whatever offset this process or thread runs with."""
    return _true_time()


def _offset() -> float:
    offset = _thread_offset.get()
    return _process_offset if offset is None else offset


def _skewed_time() -> float:
    return _true_time() + _offset()


def _skewed_time_ns() -> int:
    return _true_time_ns() + round(_offset() * 1e9)


def install(process_offset: float = 0.0) -> None:
    """Move this process's wall clock (``time.time``, ``time.time_ns``) by ``process_offset`` seconds."""
    global _process_offset
    _process_offset = process_offset
    time.time = _skewed_time
    time.time_ns = _skewed_time_ns


def uninstall() -> None:
    """Give this process its true wall clock back."""
    global _process_offset
    _process_offset = 0.0
    time.time = _true_time
    time.time_ns = _true_time_ns


@contextmanager
def offset(seconds: float) -> Iterator[None]:
    """Within this block (and the event loops and threads it starts), the wall clock is off by ``seconds``.

    Needs ``install()``: it moves ``time.time`` itself; this only says by how much, here.
    """
    token = _thread_offset.set(seconds)
    try:
        yield
    finally:
        _thread_offset.reset(token)


@dataclass(frozen=True)
class Role:
    """One worker's part: one call of ``prompt`` with ``token``, on a session or not, observed through its probe.

    Attributes:
        label: "owner" or "waiter" (named in its answers and the report).
        records: The idempotency store: "dynamodb" (``url`` of a moto server), "redis" (``url`` of a redis-server), or
            "memory" (given by the test, in-process only).
        url: The store's server.
        prompt: The call's prompt (the scripted model names it in the tool request and in the answer).
        token: The idempotency token.
        session_dir: A ``FileSessionManager`` directory every process shares, or None (no session).
        session_id: The conversation.
        mode: ``session_invocation_mode``.
        lease_seconds: Of the token claims and the session lock.
        wait_timeout_seconds: How long the call waits for another owner.
        gated: Model calls wait for the probe's ``gate``.
        crash_in_tool: The tool says so (``in_tool``) and then blocks until the process is killed.
        broken: A negative control's defect: "clock-judged", the old judgement of a lease by the wall clocks.
    """

    label: str
    records: str
    url: str
    prompt: str
    token: str
    session_dir: str | None = None
    session_id: str | None = None
    mode: str = "throw"
    lease_seconds: float = 2.0
    wait_timeout_seconds: float | None = WAIT
    gated: bool = False
    crash_in_tool: bool = False
    broken: str | None = None


class Probe:
    """One worker (process or thread) as the test sees it. Picklable only when a process is spawned (its argument).

    Times are ``time.monotonic()``: on Linux one clock for every process of the machine, and never moved.

    Queues: ``jobs`` (the one ``Role``), ``out`` (the report). Events: ``ready`` (agent built), ``go`` (the test lets
    it call), ``gate`` (releases gated model calls), ``entered`` (a model call started), ``in_tool`` (a crashing tool
    was entered), ``blocked`` (a claim or read met another owner's claim, not yielded), ``token_renewed`` and
    ``lock_renewed`` (a renewal of our token claim or session lock succeeded; the test clears them). Values:
    ``token_renewals`` and ``lock_renewals`` (successful ones), ``token_version`` and ``lock_version`` (the version of
    our last successful write of each: claim, takeover or renewal) and ``token_written_at`` and ``lock_written_at``
    (when it was sent), ``token_sending`` and ``lock_sending`` (the version of our last write sent, set before it is:
    a process killed while a write is on its way may have landed it without hearing so), ``take_over_attempts``,
    ``model_started_at`` (our first model call), ``clock_offset`` (how far ahead of the machine's wall clock the
    ``now`` of our last claim was: the offset strands_py really ran with).
    """

    def __init__(self, ctx: Any) -> None:
        self.jobs, self.out = ctx.Queue(), ctx.Queue()
        self.ready, self.go, self.gate, self.entered, self.in_tool, self.blocked = (ctx.Event() for _ in range(6))
        self.token_renewed, self.lock_renewed = ctx.Event(), ctx.Event()
        self.token_renewals, self.lock_renewals = ctx.Value("i", 0), ctx.Value("i", 0)
        self.token_version, self.lock_version = ctx.Array("c", VERSION_BYTES), ctx.Array("c", VERSION_BYTES)
        self.token_written_at, self.lock_written_at = ctx.Value("d", 0.0), ctx.Value("d", 0.0)
        self.token_sending, self.lock_sending = ctx.Array("c", VERSION_BYTES), ctx.Array("c", VERSION_BYTES)
        self.take_over_attempts = ctx.Value("i", 0)
        self.model_started_at = ctx.Value("d", 0.0)
        self.clock_offset = ctx.Value("d", 0.0)


def serve(process_offset: float, probe: Probe) -> None:
    """Process entry point: move the clock, import the agent side, wait for one ``Role``, run it, report.

    A job still running after ``HANG_SECONDS`` prints every thread's stack to stderr (the test's output).
    """
    if "strands_py" in sys.modules or "strands" in sys.modules:
        raise RuntimeError("strands was imported before the clock was moved: the offset would not reach it")
    install(process_offset)
    import skew_roles  # only now, with the clock moved

    try:
        role = probe.jobs.get(timeout=IDLE_SECONDS)
    except queue.Empty:
        return
    faulthandler.dump_traceback_later(HANG_SECONDS)
    try:
        report = skew_roles.run_role(role, probe)
    except BaseException as e:  # noqa: BLE001 - the test must hear about it, not wait for a report
        probe.out.put({"label": role.label, "crashed": f"{type(e).__name__}: {e}"})
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()
    probe.out.put(report)
