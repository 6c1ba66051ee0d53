"""Clock skew: a process ten minutes ahead never takes over a live claim or session lock; one ten minutes behind still
takes over a dead owner within about one lease plus a poll.

For DynamoDB (a serialised moto server, see ``_moto``) and Redis (a real redis-server, see ``_servers``) the owner and
the waiter are separate OS processes (``skew_worker``, spawned ahead of need), each of which moves its wall clock
(``time.time``, ``time.time_ns``) before it imports strands_py. The in-memory store lives in one process: owner and
waiter are two threads of the test process, each with a store wrapper of its own (they meet only in the store, as two
hosts would) and a clock offset of its own; a dead owner there is one whose event loop is frozen (nothing it runs
renews anything), thawed at the end to check that it stops and writes nothing.

Each waiter records when it first read each version of the other owner's record, and which version its takeover
judged. Times are ``time.monotonic()``: one clock for every process of the machine (Linux ``CLOCK_MONOTONIC``), never
moved. Takeover delays are printed (``pytest -s``) and bounded loosely (three leases), never tightly. The negative
controls run the old judgement, a lease's end read from the holder's wall clock and compared with the waiter's: ten
minutes ahead it takes a live claim (or session) over at once, ten minutes behind it waits out ten minutes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import session_worker
import skew_roles
import skew_worker
from _moto import running_moto
from _servers import running_redis

from strands_py.idempotency import IdempotencyRecord, IdempotencyStore, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.keys import make_key

pytestmark = pytest.mark.racing
WAIT = 60.0
SPAWN = multiprocessing.get_context("spawn")
OFFSET = 600.0  # ten minutes
LEASE = 3.0  # renewals every second: margin for a loaded machine (a loop stalled for a lease loses its own lease)
# "Within about one lease plus a poll", bounded loosely: a loaded machine must not fail it.
BOUND = 3 * LEASE
# Renewals come every lease / 3: a waiter that met the holder and saw this many more renewals watched it for more
# than two whole leases.
RENEWALS_WATCHED = 7
# A waiter behind gives up after this (the old judgement would wait ten minutes); the right one takes over well before.
BEHIND_TIMEOUT = 4 * LEASE
PROMPT = "What is the weather in Lima?"
HOLDER_PROMPT, OTHER_PROMPT = "What is the weather in Paris?", "What is the weather in Oslo?"
STORES = ["memory", "dynamodb", "redis"]


def _unique(name: str) -> str:
    """A name of its own for every run of a test (``hatch run stress`` repeats them)."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


def _wait(event: Any, what: str) -> None:
    assert event.wait(WAIT), f"timed out waiting for {what}"


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll counters the workers write (no sleep stands in for an event: this only re-reads them)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# Workers: processes (DynamoDB, Redis) or threads of this process (memory), behind one interface.


class Pool:
    """Worker processes started ahead of need, per clock offset (spawning and importing strands take seconds)."""

    def __init__(self) -> None:
        self.idle: dict[float, list[tuple[Any, skew_worker.Probe]]] = {}
        self.started: list[Any] = []

    def _start(self, offset: float) -> None:
        probe = skew_worker.Probe(SPAWN)
        process = SPAWN.Process(
            target=skew_worker.serve, args=(offset, probe), name=f"skew-worker{offset:+g}", daemon=True
        )
        process.start()
        self.idle.setdefault(offset, []).append((process, probe))
        self.started.append(process)

    def take(self, offset: float) -> tuple[Any, skew_worker.Probe]:
        idle = self.idle.setdefault(offset, [])
        while idle and not idle[0][0].is_alive():
            idle.pop(0)  # idled out (``skew_worker.IDLE_SECONDS``) in a long session
        if not idle:
            self._start(offset)
        return idle.pop(0)

    def top_up(self) -> None:
        """One idle process per offset used so far (between tests, so that no spawn competes with a test's run)."""
        for offset, idle in self.idle.items():
            if not idle:
                self._start(offset)

    def close(self) -> None:
        for process in self.started:
            if process.is_alive():
                process.kill()
            process.join(WAIT)


class Worker:
    """One owner or waiter: its probe, its report, its death."""

    probe: skew_worker.Probe
    reported = False

    def report(self) -> dict[str, Any]:
        try:
            report: dict[str, Any] = self.probe.out.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no report within {WAIT:g}s") from None
        self.reported = True
        assert "crashed" not in report, report["crashed"]
        return report

    def kill(self) -> float:
        """Make this worker dead as far as the store can tell; returns when it died (monotonic)."""
        raise NotImplementedError

    def resume(self) -> dict[str, Any] | None:
        """A worker that was only frozen: thaw it and return its report; None for a killed process."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class ProcessWorker(Worker):
    def __init__(self, process: Any, probe: skew_worker.Probe) -> None:
        self.process, self.probe = process, probe

    def kill(self) -> float:
        os.kill(self.process.pid, signal.SIGKILL)
        died_at = time.monotonic()
        self.process.join(WAIT)
        assert self.process.exitcode == -signal.SIGKILL
        return died_at

    def close(self) -> None:
        if self.reported:
            self.process.join(WAIT)  # it exits once it has reported
        if self.process.is_alive():
            self.process.kill()  # SIGKILL ends a blocked process too
            self.process.join(WAIT)


class ThreadWorker(Worker):
    """A role on a thread of this process with its own clock offset, its own event loop and its own store wrapper."""

    def __init__(self, role: skew_worker.Role, offset: float, store: IdempotencyStore) -> None:
        self.probe = skew_worker.Probe(SPAWN)  # multiprocessing primitives serve threads just as well
        self.loop: asyncio.AbstractEventLoop | None = None
        self.looping, self.frozen, self.thawed = threading.Event(), threading.Event(), threading.Event()
        self.frozen_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(role, offset, store), name=f"skew-{role.label}")
        self.thread.start()

    def _run(self, role: skew_worker.Role, offset: float, store: IdempotencyStore) -> None:
        try:
            with skew_worker.offset(offset):
                report = skew_roles.run_role(role, self.probe, records=store, on_loop=self._started)
        except BaseException as e:  # noqa: BLE001 - the test must hear about it, not wait for a report
            report = {"label": role.label, "crashed": f"{type(e).__name__}: {e}"}
        self.probe.out.put(report)

    def _started(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.looping.set()

    def _freeze(self) -> None:
        # Runs on the role's event loop and blocks it, as a stopped process would be: no heartbeat, no write.
        self.frozen_at = time.monotonic()
        self.frozen.set()
        self.thawed.wait(WAIT)

    def kill(self) -> float:
        _wait(self.looping, "the worker's event loop")
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._freeze)
        _wait(self.frozen, "the worker's event loop to freeze")
        return self.frozen_at

    def resume(self) -> dict[str, Any] | None:
        self.thawed.set()
        self.probe.gate.set()
        return self.report()

    def close(self) -> None:
        self.thawed.set()
        self.probe.gate.set()
        self.probe.go.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "a worker thread did not end"


class Cluster:
    """Where a test's workers run, and a store of the test's own on the same records (its clock is true)."""

    def __init__(self, kind: str, url: str, session_dir: Path, pool: Pool | None, store: IdempotencyStore) -> None:
        self.kind, self.url, self.session_dir, self.pool, self.store = kind, url, str(session_dir), pool, store
        self.workers: list[Worker] = []

    def start(self, label: str, offset: float, prompt: str, token: str, **options: Any) -> Worker:
        role = skew_worker.Role(label, self.kind, self.url, prompt, token, lease_seconds=LEASE, **options)
        worker: Worker
        if self.pool is None:
            worker = ThreadWorker(role, offset, self.store)
        else:
            worker = ProcessWorker(*self.pool.take(offset))
            worker.probe.jobs.put(role)
        self.workers.append(worker)
        return worker

    def wait_ready(self) -> None:
        for worker in self.workers:
            _wait(worker.probe.ready, "a worker to build its agent")

    @property
    def backend(self) -> session_worker.Backend:
        return session_worker.Backend("file", self.url, self.session_dir)

    def read(self, key: str) -> IdempotencyRecord | None:
        return asyncio.run(asyncio.wait_for(self.store.get(key), WAIT))

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.close()
        finally:
            if self.pool is not None:
                skew_roles.close_store(self.store)
                self.pool.top_up()


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with running_moto(skew_roles.TABLE) as server:
        yield server.url


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with running_redis() as server:
        yield server.url


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    started = Pool()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def true_clock_for_threads() -> Iterator[None]:
    """``time.time`` that each thread may move (``skew_worker.offset``); this thread's stays true."""
    skew_worker.install(0.0)
    try:
        yield
    finally:
        skew_worker.uninstall()


@pytest.fixture(params=STORES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    kind = request.param
    if kind == "memory":
        request.getfixturevalue("true_clock_for_threads")
        started = Cluster(kind, "", tmp_path / "sessions", None, InMemoryIdempotencyStore())
    else:
        url = request.getfixturevalue("moto_url" if kind == "dynamodb" else "redis_url")
        pool = request.getfixturevalue("pool")
        started = Cluster(kind, url, tmp_path / "sessions", pool, skew_roles.open_store(kind, url))
    try:
        yield started
    finally:
        started.close()


# What every test checks of a waiter.


def _ran_skewed(report: dict[str, Any], offset: float) -> None:
    """strands_py really ran with the offset: the ``now`` of the worker's claims was that far off the true clock."""
    assert abs(report["clock_offset"] - offset) < 5.0, f"the worker's claims carried {report['clock_offset']:+.1f} s"


def _judged_gone(owner: Worker, report: dict[str, Any], kind: str) -> tuple[float, float]:
    """Check the waiter's takeover of the dead owner's ``kind`` ("token" or "lock") record: it replaced exactly the
    owner's last write, a whole lease after the waiter first read it, and after the owner's own lease had ended.

    Returns:
        Seconds from the waiter's first read of that version to its takeover, and when the takeover was sent.
    """
    revocations = {r["version"] for r in report["revoked"]}
    won = [t for t in report["takeovers"] if t["kind"] == kind and t["won"] and t["version"] not in revocations]
    assert len(won) == 1, f"{kind} takeovers: {report['takeovers']}"
    (takeover,) = won
    assert takeover["version"].encode() == getattr(owner.probe, f"{kind}_version").value, "not the owner's last write"
    assert takeover["seen"] is not None, "taken over a version the waiter never read"
    watched = takeover["sent"] - takeover["seen"]
    assert watched >= LEASE, f"taken over after watching the owner's last version for {watched:.2f} s only"
    assert takeover["sent"] >= getattr(owner.probe, f"{kind}_written_at").value + LEASE, "within the owner's lease"
    return watched, takeover["sent"]


def _writes_after(report: dict[str, Any], since: float) -> list[tuple[str, str, float, Any]]:
    """The successful writes a worker sent after ``since``."""
    return [entry for entry in report["log"] if entry[0] != "get" and entry[2] >= since and entry[3] is True]


# 1. Token claims.


def _ahead_meets_a_live_claim(cluster: Cluster, broken: str | None = None) -> None:
    token = _unique("live-claim")
    owner = cluster.start("owner", 0.0, PROMPT, token, gated=True)
    waiter = cluster.start("waiter", OFFSET, PROMPT, token, broken=broken)
    cluster.wait_ready()
    owner.probe.go.set()
    _wait(owner.probe.entered, "the owner's model call")
    waiter.probe.go.set()
    _wait(waiter.probe.blocked, "the waiter to meet the owner's claim")
    started, seen = time.monotonic(), owner.probe.token_renewals.value
    _wait_for(
        lambda: owner.probe.token_renewals.value >= seen + RENEWALS_WATCHED or waiter.probe.take_over_attempts.value,
        "the owner's renewals while the waiter watches",
    )
    watched = time.monotonic() - started
    assert waiter.probe.take_over_attempts.value == 0, "the waiter ten minutes ahead took a live claim over"
    assert waiter.probe.model_started_at.value == 0.0
    owner.probe.gate.set()
    owner_report, report = owner.report(), waiter.report()

    print(
        f"\nMEASURED {cluster.kind}: a waiter {OFFSET:+g} s met a live claim, watched it {watched:.2f} s"
        f" ({owner.probe.token_renewals.value - seen} renewals, lease {LEASE:g} s) without a takeover, and replayed"
        " its result"
    )
    _ran_skewed(report, OFFSET)
    assert owner_report["outcome"] == "ok" and not owner_report["replayed"], owner_report
    assert report["outcome"] == "ok" and report["replayed"] and report["text"] == owner_report["text"], report
    assert report["model_calls"] == 0 and report["takeovers"] == []


def test_a_waiter_ten_minutes_ahead_never_takes_a_live_claim_over(cluster: Cluster) -> None:
    _ahead_meets_a_live_claim(cluster)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control: judged by the wall clocks")
def test_negative_control_a_clock_judged_waiter_ahead_takes_a_live_claim_over(cluster: Cluster) -> None:
    _ahead_meets_a_live_claim(cluster, broken="clock-judged")


def _behind_meets_a_dead_owner(cluster: Cluster, broken: str | None = None) -> None:
    token = _unique("dead-owner")
    owner = cluster.start("owner", 0.0, PROMPT, token, gated=True)
    waiter = cluster.start("waiter", -OFFSET, PROMPT, token, wait_timeout_seconds=BEHIND_TIMEOUT, broken=broken)
    cluster.wait_ready()
    owner.probe.go.set()
    _wait(owner.probe.entered, "the owner's model call")
    waiter.probe.go.set()
    _wait(waiter.probe.blocked, "the waiter to meet the owner's claim")
    # Dead just after a renewal, the worst case: a whole lease is left to wait out.
    owner.probe.token_renewed.clear()
    _wait(owner.probe.token_renewed, "a renewal of the owner's claim")
    died_at = owner.kill()
    report = waiter.report()

    _ran_skewed(report, -OFFSET)
    assert report["outcome"] == "ok" and not report["replayed"], (
        f"the waiter ten minutes behind did not take the dead owner's claim over: {report['outcome']}"
        f" {report.get('error')}"
    )
    watched, took_over_at = _judged_gone(owner, report, "token")
    print(
        f"\nMEASURED {cluster.kind}: a waiter {-OFFSET:+g} s took a dead owner's claim over {watched:.2f} s after it"
        f" first read the owner's last version, {took_over_at - died_at:.2f} s after the owner died (lease"
        f" {LEASE:g} s)"
    )
    assert watched <= BOUND and took_over_at - died_at <= BOUND
    assert report["model_calls"] == 2 and report["tool_calls"] == 1
    assert [entry[3] for entry in report["log"] if entry[0] == "complete"] == [True]
    stored = cluster.read(make_key(skew_roles.SCOPE, token))
    assert stored is not None and stored.state is RecordState.COMPLETED
    resumed = owner.resume()
    if resumed is not None:  # a frozen owner, thawed: it stops, and writes nothing
        assert resumed["outcome"] == "lease_lost", resumed
        assert _writes_after(resumed, died_at) == [], resumed["log"]


def test_a_waiter_ten_minutes_behind_takes_a_dead_owner_over_within_about_a_lease(cluster: Cluster) -> None:
    _behind_meets_a_dead_owner(cluster)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control: judged by the wall clocks")
def test_negative_control_a_clock_judged_waiter_behind_waits_for_its_wall_clock(cluster: Cluster) -> None:
    _behind_meets_a_dead_owner(cluster, broken="clock-judged")


# 2. Session locks.


def _ahead_meets_a_live_session(cluster: Cluster, mode: str, broken: str | None = None) -> None:
    session = _unique("live-session")
    session_worker.open_session(cluster.backend, session)
    where = {"session_dir": cluster.session_dir, "session_id": session}
    owner = cluster.start("owner", 0.0, HOLDER_PROMPT, _unique("holder"), gated=True, **where)
    waiter = cluster.start("waiter", OFFSET, OTHER_PROMPT, _unique("other"), mode=mode, broken=broken, **where)
    cluster.wait_ready()
    owner.probe.go.set()
    _wait(owner.probe.entered, "the holder's model call (it holds the session)")
    waiter.probe.go.set()
    if mode == "throw":
        report = waiter.report()
        assert report["outcome"] == "busy", f"the turn ten minutes ahead took a live session over: {report['outcome']}"
        watched = 0.0
    else:
        _wait(waiter.probe.blocked, "the other turn to meet the session lock")
        started, seen = time.monotonic(), owner.probe.lock_renewals.value
        _wait_for(
            lambda: owner.probe.lock_renewals.value >= seen + RENEWALS_WATCHED or waiter.probe.take_over_attempts.value,
            "the holder's renewals while the other turn waits",
        )
        watched = time.monotonic() - started
        assert waiter.probe.take_over_attempts.value == 0, "the turn ten minutes ahead took a live session over"
    owner.probe.gate.set()
    owner_report = owner.report()
    if mode == "enqueue":
        report = waiter.report()

    print(
        f"\nMEASURED {cluster.kind}, {mode}: a turn {OFFSET:+g} s met a live session lock and"
        + (" was refused at once" if mode == "throw" else f" waited, watching it {watched:.2f} s without a takeover")
    )
    _ran_skewed(report, OFFSET)
    assert owner_report["outcome"] == "ok", owner_report
    assert report["takeovers"] == [] and report["revoked"] == []
    prompts = session_worker.check_turns(session_worker.persisted(cluster.backend, session))
    if mode == "throw":
        assert report["model_calls"] == 0 and prompts == [HOLDER_PROMPT]
    else:
        # Queued behind the holder: it ran after it, on the conversation as the holder left it.
        assert report["outcome"] == "ok" and not report["replayed"], report
        assert prompts == [HOLDER_PROMPT, OTHER_PROMPT]


@pytest.mark.parametrize("mode", ["throw", "enqueue"])
def test_a_turn_ten_minutes_ahead_never_takes_a_live_session_over(cluster: Cluster, mode: str) -> None:
    _ahead_meets_a_live_session(cluster, mode)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control: judged by the wall clocks")
def test_negative_control_a_clock_judged_turn_ahead_takes_a_live_session_over(cluster: Cluster) -> None:
    _ahead_meets_a_live_session(cluster, "throw", broken="clock-judged")


def _behind_meets_a_dead_holder(cluster: Cluster, broken: str | None = None) -> None:
    session = _unique("dead-holder")
    session_worker.open_session(cluster.backend, session)
    first = session_worker.Job(cluster.backend, session, (("hello", _unique("hello")),), lease_seconds=LEASE)
    (hello,) = session_worker.turns(first, records=cluster.store)["turns"]
    assert hello["outcome"] == "ok", f"the first turn failed: {hello.get('error')}"
    # A process is killed inside its tool; a thread (memory) is frozen in its model call.
    crash = cluster.pool is not None
    where = {"session_dir": cluster.session_dir, "session_id": session}
    holder = cluster.start(
        "owner", 0.0, HOLDER_PROMPT, _unique("holder"), crash_in_tool=crash, gated=not crash, **where
    )
    waiter = cluster.start(
        "waiter",
        -OFFSET,
        OTHER_PROMPT,
        _unique("other"),
        mode="enqueue",
        wait_timeout_seconds=BEHIND_TIMEOUT,
        broken=broken,
        **where,
    )
    cluster.wait_ready()
    holder.probe.go.set()
    _wait(holder.probe.in_tool if crash else holder.probe.entered, "the holder's turn to be under way")
    # What the next turn must not build upon: the dead turn's prompt (and tool request) are persisted.
    dead_turn = session_worker.ONE_TURN[:2] if crash else session_worker.ONE_TURN[:1]
    assert (
        session_worker.shape(session_worker.persisted(cluster.backend, session)) == session_worker.ONE_TURN + dead_turn
    )
    waiter.probe.go.set()
    _wait(waiter.probe.blocked, "the other turn to meet the session lock")
    holder.probe.lock_renewed.clear()
    _wait(holder.probe.lock_renewed, "a renewal of the holder's session lock")
    died_at = holder.kill()
    report = waiter.report()

    _ran_skewed(report, -OFFSET)
    assert report["outcome"] == "ok" and not report["replayed"], (
        f"the turn ten minutes behind did not take the dead holder's session over: {report['outcome']}"
        f" {report.get('error')}"
    )
    watched, took_over_at = _judged_gone(holder, report, "lock")
    print(
        f"\nMEASURED {cluster.kind}: a turn {-OFFSET:+g} s took a dead holder's session over {watched:.2f} s after it"
        f" first read the holder's last version of the lock, {took_over_at - died_at:.2f} s after the holder died"
        f" (lease {LEASE:g} s), and rolled the dead turn back"
    )
    assert watched <= BOUND and took_over_at - died_at <= BOUND
    # The dead holder's token claim was revoked before its turn was judged void (it can never store its result now).
    (revoked,) = report["revoked"]
    assert revoked["kind"] == "token", report["revoked"]
    if revoked["version"] is not None:  # revoked by replacing it: exactly the holder's last write of it
        # The holder's last write it heard back about, or the one it had sent when it was killed: that one may have
        # landed unheard (CI: killed right after a lock renewal, its token renewal on the way was what got replaced).
        written = {holder.probe.token_version.value, holder.probe.token_sending.value}
        assert revoked["version"].encode() in written, (revoked, written)
    conversation = session_worker.persisted(cluster.backend, session)
    # The dead turn rolled back: the new turn's model was sent "hello" as the turn before it, not the dead prompt.
    assert session_worker.check_turns(conversation) == ["hello", OTHER_PROMPT]
    resumed = holder.resume()
    if resumed is not None:  # a frozen holder, thawed: it stops, and writes nothing into the conversation
        assert resumed["outcome"] == "lease_lost", resumed
        assert _writes_after(resumed, died_at) == [], resumed["log"]
        assert session_worker.persisted(cluster.backend, session) == conversation


def test_a_turn_ten_minutes_behind_takes_a_dead_holders_session_over_and_rolls_its_turn_back(cluster: Cluster) -> None:
    _behind_meets_a_dead_holder(cluster)
