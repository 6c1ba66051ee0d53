"""Leases that live, across OS processes (issue 10 §2–3), on one DynamoDB table served by a moto server.

Every test spawns real processes (``lease_worker.run``), each with its own agent and store, and follows them through
multiprocessing events and counters: a killed owner is taken over about one lease after the waiter first saw its last
version, a run many leases long keeps its claim, a paused owner that wakes up after a takeover stops and writes
nothing, and a tool call keeps its idempotency key when another process runs the invocation again. Times are
``time.monotonic()``, one clock for every process of the machine (Linux ``CLOCK_MONOTONIC``); no wall clock is read.
The measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import lease_worker as worker
import pytest
from _moto import dynamodb_store, running_moto

from strands_py.idempotency import IdempotencyRecord, RecordState
from strands_py.idempotency.codec import decode_result
from strands_py.idempotency.keys import make_key, tool_call_key
from strands_py.turn._claim import _POLL_MAX_SECONDS

WAIT = 30.0
SPAWN = multiprocessing.get_context("spawn")
HMAC_KEY = b"leases-test-hmac-key-0123456789ab"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A serialised moto server on a random free loopback port with the table created; stopped after the module."""
    with running_moto(worker.TABLE) as server:
        yield server.url


class Pool:
    """Worker processes started ahead of need: spawning one and importing strands takes seconds, waiting is free.

    Each process runs one job; taking one tops the idle ones up to ``warm`` again, and the idle ones are killed at
    the end. Only ``first`` are started at once, so that the first test does not wait for all of them on two cores.
    """

    def __init__(self, endpoint: str, warm: int, first: int) -> None:
        self.endpoint = endpoint
        self.warm = warm
        self.idle: list[tuple[Any, worker.Probe]] = []
        self.started: list[Any] = []
        for _ in range(first):
            self._start()

    def _start(self) -> None:
        probe = worker.Probe(SPAWN)
        process = SPAWN.Process(target=worker.serve, args=(self.endpoint, probe), name="lease-worker", daemon=True)
        process.start()
        self.idle.append((process, probe))
        self.started.append(process)

    def take(self) -> tuple[Any, worker.Probe]:
        taken = self.idle.pop(0)
        while len(self.idle) < self.warm:
            self._start()
        return taken

    def close(self) -> None:
        for process in self.started:
            if process.is_alive():
                process.kill()
            process.join(WAIT)


@pytest.fixture(scope="module")
def pool(endpoint: str) -> Iterator[Pool]:
    """Warm worker processes: four once the first is taken (the most a test uses); all killed after the module."""
    started = Pool(endpoint, warm=4, first=2)
    try:
        yield started
    finally:
        started.close()


class Workers:
    """The worker processes of one test; on exit each is joined (if it reported) or killed, whatever happened."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.processes: dict[str, Any] = {}
        self.probes: dict[str, worker.Probe] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        for label, process in self.processes.items():
            if label in self.reports:
                process.join(WAIT)
            if process.is_alive():
                process.kill()  # SIGKILL ends a stopped process too
                process.join(WAIT)

    def spawn(self, label: str, token: str, **options: Any) -> worker.Probe:
        process, probe = self.pool.take()
        self.processes[label], self.probes[label] = process, probe
        probe.jobs.put((label, token, options))
        return probe

    def wait_ready(self) -> None:
        for label, probe in self.probes.items():
            _wait(probe.ready, f"{label} to build its agent")

    def signal(self, label: str, signum: int) -> None:
        os.kill(self.processes[label].pid, signum)

    def kill(self, label: str) -> None:
        self.signal(label, signal.SIGKILL)
        self.processes[label].join(WAIT)
        assert self.processes[label].exitcode == -signal.SIGKILL

    def report(self, label: str) -> dict[str, Any]:
        if label not in self.reports:
            try:
                self.reports[label] = self.probes[label].out.get(timeout=WAIT)
            except queue.Empty:
                # A hang, not a broken guarantee (TimeoutError: a negative control does not count it as its failure).
                # The worker has printed its threads' stacks to the test's output (lease_worker.HANG_SECONDS).
                raise TimeoutError(f"{label} did not report within {WAIT:g}s") from None
        return self.reports[label]

    def tool_key(self, label: str) -> str:
        """The next tool-call key ``label`` reported."""
        reported, key = self.probes[label].keys.get(timeout=WAIT)
        assert reported == label
        return str(key)

    def tool_keys_left(self) -> dict[str, list[str]]:
        """Every tool-call key not read yet, by process label (complete only once the processes have exited)."""
        found: dict[str, list[str]] = {}
        for label, probe in self.probes.items():
            while True:
                try:
                    found.setdefault(label, []).append(probe.keys.get_nowait()[1])
                except queue.Empty:
                    break
        return {label: keys for label, keys in found.items() if keys}


def _token(name: str) -> str:
    """A token of its own for every run of a test (``pytest --count``, ``hatch run stress`` repeat them)."""
    return f"{name}-{uuid.uuid4().hex}"


def _wait(event: Any, what: str) -> None:
    if not event.wait(WAIT):
        raise TimeoutError(f"timed out waiting for {what}")


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll shared counters written by the workers (no sleep stands in for an event: this only re-reads them)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _stored(endpoint: str, token: str, hmac_key: bytes | None = None) -> IdempotencyRecord | None:
    with dynamodb_store(endpoint, worker.TABLE) as store:
        return asyncio.run(asyncio.wait_for(store.get(make_key(worker.SCOPE, token, hmac_key)), WAIT))


def _answer(record: IdempotencyRecord | None) -> str:
    assert record is not None and record.state is RecordState.COMPLETED
    return str(decode_result(record, None)).strip()


def _log(report: dict[str, Any], primitive: str) -> list[tuple[str, float, float, Any]]:
    return [entry for entry in report["store_log"] if entry[0] == primitive]


def _judged_gone(owner: worker.Probe, taker: worker.Probe, lease: float) -> float:
    """Check how ``taker`` judged ``owner`` gone: it replaced exactly the owner's last write, after watching it.

    The takeover's compare-and-set named the version of the owner's last successful write, was sent a whole lease
    after the taker first read that version (its own monotonic clock), and after the owner's own lease, counted from
    when that write was sent, had ended.

    Returns:
        Seconds from the taker's first read of that version to its takeover.
    """
    assert taker.judged_version.value == owner.version.value, "the takeover replaced another write than the last"
    assert taker.judged_seen_at.value > 0, "the taker took over a version it never read"
    watched = taker.took_over_at.value - taker.judged_seen_at.value
    assert watched >= lease, f"taken over after watching the owner's last version for {watched:.2f} s only"
    assert taker.took_over_at.value >= owner.written_at.value + lease, "taken over within the owner's own lease"
    return watched


# 1. A killed owner is taken over within one lease (plus one poll) of the waiter's first sight of its last version.


@pytest.mark.racing
def test_a_killed_owner_is_taken_over_within_one_lease(endpoint: str, pool: Pool) -> None:
    lease, token = 5.0, _token("invoice-killed-owner")
    with Workers(pool) as workers:
        owner = workers.spawn("owner", token, lease_seconds=lease, gate_from=1, with_tool=False)
        retry = workers.spawn("retry", token, lease_seconds=lease, with_tool=False)
        workers.wait_ready()
        owner.go.set()
        _wait(owner.entered, "the owner's model call")
        retry.go.set()
        _wait_for(lambda: retry.claim_attempts.value >= 1, "the retry's claim attempt")
        # Killed just after a renewal, the worst case: a whole lease is left to wait out.
        owner.renewed.clear()
        _wait(owner.renewed, "a renewal of the owner's lease")
        workers.kill("owner")
        killed_at = time.monotonic()
        report = workers.report("retry")

    watched = _judged_gone(owner, retry, lease)
    took_over_at, model_at = retry.took_over_at.value, retry.model_started_at.value
    print(
        f"\nMEASURED takeover after SIGKILL, lease {lease:g} s: {watched:.2f} s from the retry's first read of the dead"
        f" owner's last version to its takeover, {took_over_at - killed_at:.2f} s from the kill,"
        f" {model_at - killed_at:.2f} s from the kill to its model call"
    )
    assert report["result"] == "answer from retry" and not report["replayed"]
    assert report["model_calls"] == 1 and report["heartbeats_left"] == 0
    # Never before a whole lease of the same version (checked above); within one lease plus one poll interval of the
    # first sight of it, and of the kill (plus slack for a loaded machine).
    assert watched <= lease + _POLL_MAX_SECONDS + 3.0
    assert took_over_at - killed_at <= lease + _POLL_MAX_SECONDS + 3.0
    # One claim attempt that met the owner's claim, then one takeover: a compare-and-set on the version judged.
    assert [entry[3] for entry in _log(report, "claim")] == [False]
    assert [entry[3] for entry in _log(report, "take_over")] == [True]
    assert [entry[3] for entry in _log(report, "complete")] == [True]
    assert _answer(_stored(endpoint, token)) == "answer from retry"


# 2. A run three times longer than its lease keeps its claim: no takeover, one model run.


def _run_three_leases_long(endpoint: str, pool: Pool, token: str, broken: str | None = None) -> None:
    lease, renewals = 2.0, 9
    with Workers(pool) as workers:
        owner = workers.spawn("owner", token, lease_seconds=lease, gate_from=1, with_tool=False, broken=broken)
        retry = workers.spawn("retry", token, lease_seconds=lease, with_tool=False)
        workers.wait_ready()
        owner.go.set()
        _wait(owner.entered, "the owner's model call")
        retry.go.set()
        _wait_for(lambda: retry.claim_attempts.value >= 1, "the retry's claim attempt")
        # The owner's model call is held until it has renewed 9 times (3 leases) and 5 times (2.5 leases) while the
        # retry waited. A takeover would show as the retry's model call starting.
        seen = owner.renewals.value
        _wait_for(
            lambda: owner.renewals.value >= max(renewals, seen + 5) or retry.model_started_at.value > 0,
            "the owner's renewals",
        )
        assert retry.model_started_at.value == 0, "the retry took a running invocation over"
        owner.gate.set()
        owner_report, retry_report = workers.report("owner"), workers.report("retry")

    claim, complete = _log(owner_report, "claim"), _log(owner_report, "complete")
    renewed = _log(owner_report, "renew")
    run_seconds = complete[0][1] - claim[0][1]
    print(f"\nMEASURED long run, lease {lease:g} s: ran {run_seconds:.2f} s with {len(renewed)} renewals, no takeover")
    assert owner_report["result"] == "answer from owner" and not owner_report["replayed"]
    assert owner_report["model_calls"] == 1 and owner_report["heartbeats_left"] == 0
    assert run_seconds >= 3 * lease
    assert len(renewed) >= renewals and all(entry[3] for entry in renewed)
    assert [entry[3] for entry in complete] == [True] and not _log(owner_report, "release")
    # The heartbeat stopped before the result was stored: no renewal was sent after it.
    assert all(entry[1] < complete[0][1] for entry in renewed)
    # The other process waited (one claim attempt, never a takeover attempt) and replayed the owner's result.
    assert retry_report["result"] == "answer from owner" and retry_report["replayed"]
    assert retry_report["model_calls"] == 0 and [entry[3] for entry in _log(retry_report, "claim")] == [False]
    assert not _log(retry_report, "take_over")
    assert _answer(_stored(endpoint, token)) == "answer from owner"


@pytest.mark.racing
def test_a_run_three_leases_long_is_not_taken_over(endpoint: str, pool: Pool) -> None:
    _run_three_leases_long(endpoint, pool, _token("invoice-long-run"))


@pytest.mark.racing
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="negative control: without heartbeats a run longer than its lease is taken over",
)
def test_negative_control_without_heartbeats_a_long_run_is_taken_over(endpoint: str, pool: Pool) -> None:
    _run_three_leases_long(endpoint, pool, _token("invoice-long-run-no-heartbeats"), broken="no-heartbeats")


# 3. A paused owner (SIGSTOP past its lease, SIGCONT after the takeover) stops and writes nothing.


def _pause_owner_past_its_lease(endpoint: str, pool: Pool, token: str, broken: str | None = None) -> None:
    lease = 2.0
    with Workers(pool) as workers:
        owner = workers.spawn("owner", token, lease_seconds=lease, gate_from=1, broken=broken, calls=2)
        taker = workers.spawn("taker", token, lease_seconds=lease, gate_from=1)
        workers.wait_ready()
        owner.go.set()
        _wait(owner.entered, "the owner's first model call")
        taker.go.set()
        _wait_for(lambda: taker.claim_attempts.value >= 1, "the taker's claim attempt")
        # Stopped just after a renewal: between two store requests, never in the middle of one.
        owner.renewed.clear()
        _wait(owner.renewed, "a renewal of the owner's lease")
        workers.signal("owner", signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The taker takes the claim over once it has seen the owner's last version for a whole lease, and holds in
        # its own first model call.
        _wait(taker.entered, "the taker's model call (it took the claim over)")
        workers.signal("owner", signal.SIGCONT)
        resumed_at = time.monotonic()
        owner.gate.set()  # the owner's model call returns (asking for the pay tool) while the taker runs
        owner_report = workers.report("owner")
        taker.gate.set()
        taker_report = workers.report("taker")
    # Read once every process has exited: a process flushes its queues before it exits, not before it reports.
    keys = workers.tool_keys_left()

    watched = _judged_gone(owner, taker, lease)
    print(
        f"\nMEASURED paused owner, lease {lease:g} s: taken over {taker.took_over_at.value - stopped_at:.2f} s after"
        f" SIGSTOP ({watched:.2f} s after the taker first read its last version); the resumed owner gave up"
        f" {owner_report['ended'] - resumed_at:.2f} s after SIGCONT"
    )
    # The resumed owner stopped: its caller and its duplicate in the same process got the error, its tool never
    # ran, and it wrote nothing after it woke up (its release was fenced off).
    assert [o.get("error") for o in owner_report["outcomes"]] == ["IdempotencyLeaseLostError"] * 2, owner_report
    assert owner_report["tool_calls"] == 0 and "owner" not in keys
    assert owner_report["model_calls"] == 1 and owner_report["heartbeats_left"] == 0
    assert not _log(owner_report, "complete")
    late_writes = [e for e in owner_report["store_log"] if e[0] != "get" and e[1] >= stopped_at and e[3]]
    assert late_writes == []
    # The taker ran the invocation once and stored its own result.
    assert taker_report["result"] == "answer from taker" and not taker_report["replayed"]
    assert taker_report["model_calls"] == 2 and taker_report["tool_calls"] == 1 and len(keys["taker"]) == 1
    assert [entry[3] for entry in _log(taker_report, "take_over")] == [True]
    assert [entry[3] for entry in _log(taker_report, "complete")] == [True]
    assert _answer(_stored(endpoint, token)) == "answer from taker"


@pytest.mark.racing
def test_a_paused_owner_resumed_after_a_takeover_stops_and_writes_nothing(endpoint: str, pool: Pool) -> None:
    _pause_owner_past_its_lease(endpoint, pool, _token("invoice-paused-owner"))


@pytest.mark.racing
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="negative control: an owner that ignores a lost lease runs its tool again",
)
def test_negative_control_an_owner_ignoring_its_lost_lease_runs_its_tool(endpoint: str, pool: Pool) -> None:
    _pause_owner_past_its_lease(endpoint, pool, _token("invoice-paused-owner-ignoring"), broken="ignores-lease-loss")


# 4. A tool call keeps its idempotency key when another process runs the invocation again.


def _tool_keys_across_a_takeover(
    endpoint: str, pool: Pool, token: str, broken: str | None = None, *, with_hmac: bool = True
) -> None:
    lease = 2.0
    hmac_keys = {"plain": None, "keyed": HMAC_KEY} if with_hmac else {"plain": None}
    with Workers(pool) as workers:
        owners = {
            name: workers.spawn(f"owner-{name}", token, lease_seconds=lease, gate_from=2, hmac_key=h, broken=broken)
            for name, h in hmac_keys.items()
        }
        retries = {
            name: workers.spawn(f"retry-{name}", token, lease_seconds=lease, hmac_key=h, broken=broken)
            for name, h in hmac_keys.items()
        }
        workers.wait_ready()
        for probe in owners.values():
            probe.go.set()
        # Each owner's tool ran and reported its key; the model's next call hangs at the gate.
        owner_keys = {name: workers.tool_key(f"owner-{name}") for name in owners}
        for name, probe in owners.items():
            _wait(probe.entered, f"the second model call of owner-{name}")
        for probe in retries.values():
            probe.go.set()
        _wait_for(lambda: all(p.claim_attempts.value >= 1 for p in retries.values()), "the retries' claim attempts")
        for name in owners:
            workers.kill(f"owner-{name}")
        reports = {name: workers.report(f"retry-{name}") for name in retries}
        retry_keys = {name: workers.tool_key(f"retry-{name}") for name in retries}
    # Each tool ran once per process (read once every process has exited and flushed its queues).
    assert workers.tool_keys_left() == {}

    for name, hmac_key in hmac_keys.items():
        report = reports[name]
        assert report["result"] == f"answer from retry-{name}" and not report["replayed"]
        assert report["model_calls"] == 2 and report["tool_calls"] == 1
        expected = tool_call_key(make_key(worker.SCOPE, token, hmac_key), worker.TOOL, worker.TOOL_INPUT, 1, hmac_key)
        assert owner_keys[name] == retry_keys[name], f"{name}: the re-run got another key"
        assert retry_keys[name] == expected
    if with_hmac:
        assert owner_keys["plain"] != owner_keys["keyed"]
        print(
            f"\nMEASURED tool-call key across a takeover: {owner_keys['plain'][:16]}… without hmac_key,"
            f" {owner_keys['keyed'][:16]}… with it; each the same in both processes"
        )


@pytest.mark.racing
def test_a_tool_call_keeps_its_key_when_another_process_runs_it_again(endpoint: str, pool: Pool) -> None:
    _tool_keys_across_a_takeover(endpoint, pool, _token("invoice-tool-keys"))


@pytest.mark.racing
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="negative control: a key from the model's toolUseId changes with the re-run",
)
def test_negative_control_a_key_from_the_tool_use_id_changes_across_processes(endpoint: str, pool: Pool) -> None:
    _tool_keys_across_a_takeover(
        endpoint, pool, _token("invoice-tool-keys-from-ids"), broken="keys-from-tool-use-id", with_hmac=False
    )


# 5. Store writes per minute per running invocation.


@pytest.mark.racing
def test_store_writes_per_minute_of_a_running_invocation(endpoint: str, pool: Pool) -> None:
    lease, renewals, token = 1.5, 10, _token("invoice-writes-per-minute")
    with Workers(pool) as workers:
        owner = workers.spawn("owner", token, lease_seconds=lease, gate_from=1, with_tool=False)
        workers.wait_ready()
        owner.go.set()
        _wait(owner.entered, "the owner's model call")
        _wait_for(lambda: owner.renewals.value >= renewals, "the owner's renewals")
        owner.gate.set()
        report = workers.report("owner")

    operations = report["operations"]
    updates = [t for name, t in operations if name == "UpdateItem"]
    first, last = updates[0], updates[-1]
    window = [name for name, t in operations if first <= t <= last and name in worker.WRITES]
    per_minute = (len(window) - 1) / (last - first) * 60
    expected = 60 / (lease / 3)
    writes = [name for name, _ in operations if name in worker.WRITES]
    print(
        f"\nMEASURED store writes while running, lease {lease:g} s: {per_minute:.1f} per minute (expected"
        f" {expected:.0f} = 180 / lease; {180 / 30:.0f} at the default 30 s lease); the whole"
        f" {report['ended'] - report['started']:.1f} s invocation wrote {len(writes)} times: {_tally(writes)}"
    )
    assert report["result"] == "answer from owner" and report["heartbeats_left"] == 0
    # While it runs, an invocation writes one UpdateItem per renewal, and nothing else.
    assert set(window) == {"UpdateItem"} and len(updates) == len(_log(report, "renew")) >= renewals
    # Never more often than every lease / 3 (each renewal also waits for its round trip); a loaded machine is slower.
    assert 0.5 * expected <= per_minute <= 1.05 * expected
    assert writes.count("PutItem") == 2  # its claim and its result


def _tally(names: list[str]) -> str:
    return ", ".join(f"{name} {names.count(name)}" for name in sorted(set(names)))
