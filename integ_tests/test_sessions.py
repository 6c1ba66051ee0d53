"""Conversations across OS processes (issue 11): the session lock, enqueue or reject, and rollback of a killed turn.

Every test runs turns in real processes (``session_worker.serve``, spawned ahead of need), each building an Agent per
turn on one conversation: a ``FileSessionManager`` directory, or an ``S3SessionManager`` bucket on a moto server, with
the idempotency records in DynamoDB on the same server (serialised, see ``_moto``; started and stopped by this
module). The test follows the processes through multiprocessing events and reads the persisted conversation at the
end: every turn must be the prompt, the tool cycle about that prompt and the answer to it, and the answer must say the
model was sent the turn persisted just before it (the conversation was read again under the lock, and rolled back
after a crash). The measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import session_worker as worker
from _moto import running_moto

from strands_py.turn._claim import _POLL_MAX_SECONDS

pytestmark = pytest.mark.racing
WAIT = 60.0
LEASE = 3.0  # renewals every second: margin for a loaded machine; a killed owner is taken over about 3 s later
SPAWN = multiprocessing.get_context("spawn")
PROMPT = "What is the weather in Rome?"

ONE_TURN = worker.ONE_TURN
_shape, _prompts, _turns = worker.shape, worker.prompts_of, worker.check_turns


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A serialised moto server (DynamoDB table and S3 bucket created) on a free loopback port; stopped after."""
    with running_moto(worker.TABLE) as server:
        s3 = boto3.client("s3", region_name=worker.REGION, endpoint_url=server.url, **worker.CREDENTIALS)
        s3.create_bucket(Bucket=worker.BUCKET)
        yield server.url


def _backend(kind: str, moto_url: str, tmp_path: Path) -> worker.Backend:
    # A fresh directory or key prefix per test, so that repetitions (hatch run stress) never meet.
    where = str(tmp_path / "sessions") if kind == "file" else f"run-{uuid.uuid4().hex}/"
    return worker.Backend(kind, moto_url, where)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, moto_url: str, tmp_path: Path) -> worker.Backend:
    """FileSessionManager on a directory shared by the processes, or S3SessionManager on the moto server."""
    return _backend(request.param, moto_url, tmp_path)


@pytest.fixture
def file_backend(moto_url: str, tmp_path: Path) -> worker.Backend:
    """FileSessionManager on a directory shared by the processes."""
    return _backend("file", moto_url, tmp_path)


class Pool:
    """Worker processes started ahead of need: spawning one and importing strands takes seconds, waiting is free.

    Each process runs one job; the idle ones are topped up to ``warm`` after each test and killed at the end.
    """

    def __init__(self, warm: int, diagnostics: Path) -> None:
        self.warm = warm
        self.diagnostics = diagnostics
        self.idle: list[tuple[Any, worker.Probe]] = []
        self.started: list[Any] = []
        self.top_up()

    def _start(self) -> None:
        probe = worker.Probe(SPAWN, str(self.diagnostics))
        process = SPAWN.Process(target=worker.serve, args=(probe,), name="session-worker", daemon=True)
        process.start()
        self.idle.append((process, probe))
        self.started.append(process)

    def take(self) -> tuple[Any, worker.Probe]:
        while self.idle and not self.idle[0][0].is_alive():
            self.idle.pop(0)  # idled out (``worker.IDLE_SECONDS``) in a long session
        if not self.idle:
            self._start()
        return self.idle.pop(0)

    def top_up(self) -> None:
        """Start processes until ``warm`` are idle (between tests, so that no spawn competes with a test's run)."""
        while len(self.idle) < self.warm:
            self._start()

    def close(self) -> None:
        for process in self.started:
            if process.is_alive():
                process.kill()
            process.join(WAIT)


@pytest.fixture(scope="module")
def pool(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Four warm worker processes (the most a test uses at once); all killed after the module."""
    started = Pool(warm=4, diagnostics=tmp_path_factory.mktemp("session-workers"))
    try:
        yield started
    finally:
        started.close()


def _session(name: str) -> str:
    # The default durable scope includes the session: a fresh id keeps repetitions from replaying each other's turns.
    return f"{name}-{uuid.uuid4().hex[:12]}"


class Workers:
    """The worker processes of one test; on exit each is joined (it reported) or killed, whatever happened."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.processes: list[tuple[Any, worker.Probe]] = []
        self.reported: set[int] = set()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        for process, probe in self.processes:
            if id(probe) in self.reported:
                process.join(WAIT)
            if process.is_alive():
                process.kill()
                process.join(WAIT)
        self.pool.top_up()

    def start(self, job: worker.Job) -> worker.Probe:
        process, probe = self.pool.take()
        self.processes.append((process, probe))
        probe.jobs.put(job)
        return probe

    def wait_ready(self) -> None:
        for _, probe in self.processes:
            _wait(probe.ready, "a worker to set up")

    def kill(self, probe: worker.Probe) -> None:
        process = next(p for p, q in self.processes if q is probe)
        os.kill(process.pid, signal.SIGKILL)
        process.join(WAIT)
        assert process.exitcode == -signal.SIGKILL

    def dump_stacks(self) -> None:
        """Ask every live worker to write its threads' stacks (what was it waiting for?); say where to read them."""
        for process, _ in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGUSR1)
        for process, _ in self.processes:
            process.join(0.5)  # only on the way to a failure: time for the dumps to be written before the kill
        print(f"\nworker stacks and logs: {self.pool.diagnostics} (pids {[p.pid for p, _ in self.processes]})")

    def report(self, probe: worker.Probe, timeout: float = WAIT) -> dict[str, Any]:
        try:
            report: dict[str, Any] = probe.out.get(timeout=timeout)
        except queue.Empty:
            self.dump_stacks()
            raise AssertionError(f"no report from a worker within {timeout:g}s") from None
        self.reported.add(id(probe))
        assert "crashed" not in report, report["crashed"]
        return report


def _wait(event: Any, what: str) -> None:
    assert event.wait(WAIT), f"timed out waiting for {what}"


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll flags the workers set (no sleep stands in for an event: this only re-reads them)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# 1. The owner is killed inside its tool; a retry of the same request in another process rolls back and runs.


def _killed_turn(pool: Pool, backend: worker.Backend, mode: str, breakage: str | None = None) -> None:
    reference = _session("reference")
    worker.turns(worker.Job(backend, reference, (("hello", "t0"), (PROMPT, "t1")), lease_seconds=LEASE))
    uninterrupted = worker.persisted(backend, reference)

    session = _session("killed")
    worker.turns(worker.Job(backend, session, (("hello", "t0"),), lease_seconds=LEASE))
    turn = ((PROMPT, "t1"),)
    # The owner's session lock is claimed half a renewal interval after its token (a slow round trip), so the two
    # leases are renewed that far apart and the lock's last version is written after the token's. The retry meets the
    # lock only once it has taken the token over, and watches it afresh: a whole lease of its own clock again.
    lag = LEASE / 3 / 2
    with Workers(pool) as workers:
        owner = workers.start(
            worker.Job(backend, session, turn, mode=mode, lease_seconds=LEASE, crash_in_tool=True, lock_claim_delay=lag)
        )
        retry = workers.start(worker.Job(backend, session, turn, mode=mode, lease_seconds=LEASE, breakage=breakage))
        workers.wait_ready()
        owner.go.set()
        _wait(owner.in_tool, "the owner's tool")
        # What a retry must not build upon: the dead turn's prompt and tool request are persisted.
        assert _shape(worker.persisted(backend, session)) == ONE_TURN + ONE_TURN[:2]
        retry.go.set()
        _wait(retry.blocked, "the retry to meet the owner's claim")
        owner.lock_renewed.clear()
        _wait(owner.lock_renewed, "a renewal of the owner's session lock")
        workers.kill(owner)
        killed_at = time.monotonic()
        report = workers.report(retry)

    (retried,) = report["turns"]
    # A retry of the same request is never refused because of its own dead run, whatever the mode: it waits that run's
    # lock out, rolls the dead turn back and runs.
    assert retried["outcome"] == "ok", f"the retry failed: {retried['outcome']}: {retried.get('error')}"
    assert not retried["replayed"] and report["model_calls"] == 2 and report["tool_calls"] == 1
    takeover = retry.model_started_at.value - killed_at
    later = owner.lock_written_at.value - owner.token_written_at.value
    token_watched, lock_watched = retry.token_watched.value, retry.lock_watched.value
    print(
        f"\nMEASURED {backend.kind}, {mode}: SIGKILL inside the tool, lease {LEASE:g} s: the retry took the token over"
        f" {token_watched:.2f} s after it first read the dead owner's last version of it, then the session lock"
        f" {lock_watched:.2f} s after its first read of that; its model call started {takeover:.2f} s after the kill,"
        f" its turn ended {retried['ended'] - killed_at:.2f} s after it (the dead owner's lock was last written"
        f" {later:.2f} s after its token claim)"
    )
    # Each record judged after a whole lease of the same version, and within about one lease plus a poll of the first
    # sight of it; the two one after the other (the lock is met once the token is taken).
    assert retry.takeovers.value == 2
    for watched in (token_watched, lock_watched):
        assert LEASE <= watched <= LEASE + _POLL_MAX_SECONDS + 2.0, f"watched {watched:.2f} s"
    assert takeover <= 2 * (LEASE + _POLL_MAX_SECONDS) + 2.0, "the retry waited much longer than two leases"

    conversation = worker.persisted(backend, session)
    # The shape of one uninterrupted run: the prompt once, no dangling toolUse, no second user turn.
    assert _shape(conversation) == _shape(uninterrupted) == ONE_TURN * 2
    assert _prompts(conversation) == _prompts(uninterrupted) == ["hello", PROMPT]
    assert _turns(conversation) == ["hello", PROMPT]

    # Later retries replay the stored answer and leave the conversation alone.
    later = worker.turns(worker.Job(backend, session, turn, mode=mode, lease_seconds=LEASE))
    assert later["turns"][0]["replayed"] and later["model_calls"] == 0, later
    assert worker.persisted(backend, session) == conversation


@pytest.mark.parametrize("mode", ["throw", "enqueue"])
def test_a_turn_killed_inside_its_tool_is_rolled_back_and_run_once_by_a_retry_in_another_process(
    pool: Pool, backend: worker.Backend, mode: str
) -> None:
    _killed_turn(pool, backend, mode)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_throw_mode_retry_that_takes_its_own_dead_run_for_another_request_is_refused(
    pool: Pool, file_backend: worker.Backend
) -> None:
    _killed_turn(pool, file_backend, "throw", breakage="own_lock_is_busy")


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_without_rollback_the_retry_builds_on_the_dead_turn(
    pool: Pool, file_backend: worker.Backend
) -> None:
    _killed_turn(pool, file_backend, "enqueue", breakage="no_rollback")


# 2. Two processes, one session, two different requests at the same moment.


def _two_requests(
    pool: Pool, backend: worker.Backend, mode: str, breakage: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Both processes build their Agent (read the conversation), then are let go together; the model call of the one
    that takes the session is held until the other has met the session lock.

    Returns:
        The report of the process that took the session first, the other's, and the persisted conversation.
    """
    session = _session(f"two-{mode}")
    worker.open_session(backend, session)
    prompts = ["What is the weather in Paris?", "What is the weather in Oslo?"]
    with Workers(pool) as workers:
        probes = [
            workers.start(
                worker.Job(
                    backend,
                    session,
                    ((prompt, f"request-{index}"),),
                    mode=mode,
                    lease_seconds=LEASE,
                    gated=True,
                    build_first=True,
                    breakage=breakage,
                )
            )
            for index, prompt in enumerate(prompts)
        ]
        workers.wait_ready()
        for probe in probes:
            probe.go.set()
        _wait_for(lambda: any(p.entered.is_set() for p in probes), "the model call of the turn that took the session")
        _wait_for(lambda: any(p.blocked.is_set() for p in probes), "the other request to meet the session lock")
        for probe in probes:
            probe.gate.set()
        reports = [workers.report(p) for p in probes]
    blocked = [p.blocked.is_set() for p in probes]
    assert sorted(blocked) == [False, True], "exactly one request met the other's lock"
    other = blocked.index(True)
    return reports[1 - other], reports[other], worker.persisted(backend, session)


def _rejected(pool: Pool, backend: worker.Backend, breakage: str | None = None) -> None:
    first, other, conversation = _two_requests(pool, backend, "throw", breakage)
    (landed,), (refused,) = first["turns"], other["turns"]
    assert landed["outcome"] == "ok" and not landed["replayed"], landed
    assert refused["outcome"] == "busy" and refused["concurrency"], refused  # SessionBusyError: ConcurrencyException
    assert other["model_calls"] == 0 and other["tool_calls"] == 0
    assert _turns(conversation) == [landed["prompt"]]


def test_throw_mode_rejects_the_other_request_and_the_first_turn_lands(pool: Pool, backend: worker.Backend) -> None:
    _rejected(pool, backend)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_throw_mode_that_waits_runs_both(pool: Pool, file_backend: worker.Backend) -> None:
    _rejected(pool, file_backend, breakage="throw_waits")


def _queued(pool: Pool, backend: worker.Backend, breakage: str | None = None) -> None:
    first, other, conversation = _two_requests(pool, backend, "enqueue", breakage)
    (landed,), (queued,) = first["turns"], other["turns"]
    assert landed["outcome"] == "ok" and queued["outcome"] == "ok", (landed, queued)
    assert queued["ended"] > landed["ended"]
    # Both landed, one after the other, and the queued turn's model was sent the first turn (read under the lock).
    assert _turns(conversation) == [landed["prompt"], queued["prompt"]]
    print(
        f"\nMEASURED {backend.kind}: the queued turn ended {queued['ended'] - landed['ended']:.2f} s after the first"
        f" (it met the held lock {other['blocked']} times)"
    )


def test_enqueue_mode_lands_both_turns_one_after_the_other(pool: Pool, backend: worker.Backend) -> None:
    _queued(pool, backend)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_without_re_reading_under_the_lock_the_queued_turn_overwrites_the_first(
    pool: Pool, file_backend: worker.Backend
) -> None:
    _queued(pool, file_backend, breakage="no_reread")


# 3. Four processes, 25 turns each, one session, enqueue.


@pytest.mark.timeout(240)  # 100 turns: about 20 s alone, several times that beside two CPU burners
def test_four_processes_of_twenty_five_turns_on_one_session_lose_and_duplicate_nothing(
    pool: Pool, file_backend: worker.Backend
) -> None:
    processes, per_process, deadline = 4, 25, 180.0
    session = _session("busy")
    worker.open_session(file_backend, session)
    turns = [
        tuple((f"process {w} turn {i:02d}: weather?", f"p{w}-t{i}") for i in range(per_process))
        for w in range(processes)
    ]
    with Workers(pool) as workers:
        probes = [
            workers.start(
                worker.Job(
                    file_backend,
                    session,
                    job_turns,
                    mode="enqueue",
                    lease_seconds=LEASE,
                    wait_timeout_seconds=WAIT,
                    retries=2,
                )
            )
            for job_turns in turns
        ]
        workers.wait_ready()
        started = time.monotonic()
        for probe in probes:
            probe.go.set()
        try:
            reports = [workers.report(p, timeout=max(0.0, started + deadline - time.monotonic())) for p in probes]
        except AssertionError as e:
            progress = [p.turns_done.value for p in probes]
            raise AssertionError(f"{e}; turns done per process: {progress} (a turn that never ends?)") from None
        elapsed = time.monotonic() - started

    finished = [t for r in reports for t in r["turns"]]
    failed = [t for t in finished if t["outcome"] != "ok" or (t["replayed"] and not t["retried"])]
    assert not failed, [(t["prompt"], t["outcome"], t.get("error"), t["retried"]) for t in failed]
    prompts = _turns(worker.persisted(file_backend, session))
    assert len(prompts) == processes * per_process
    assert sorted(prompts) == sorted(p for job_turns in turns for p, _ in job_turns), "a prompt lost or duplicated"
    for w, job_turns in enumerate(turns):
        assert [p for p in prompts if p.startswith(f"process {w} ")] == [p for p, _ in job_turns]
    handovers = sum(a.split()[1] != b.split()[1] for a, b in zip(prompts, prompts[1:], strict=False))
    retried = [error for t in finished for error in t["retried"]]
    print(
        f"\nMEASURED {processes} processes x {per_process} turns, one session, enqueue: {elapsed:.1f} s,"
        f" {len(prompts) / elapsed:.1f} turns/s; the lock changed process {handovers} times;"
        f" lock or claim found held, per process: {[r['blocked'] for r in reports]};"
        f" turns sent again: {len(retried)} {sorted({e.split(':')[0] for e in retried})}"
    )
