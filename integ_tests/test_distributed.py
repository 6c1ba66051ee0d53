"""Many OS processes, one DynamoDB table (moto server on 127.0.0.1): one token runs once, everywhere."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import distributed_worker as worker
import pytest
from _moto import running_moto

from strands_py.idempotency import IdempotencyWaitTimeoutError, ReplayedAgentResult
from strands_py.testing.bedrock import STUB_ANSWER

pytestmark = pytest.mark.racing
WAIT = 60.0
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A serialised moto server (see ``_moto``) on a random free loopback port, with the table; stopped after."""
    with running_moto(worker.TABLE) as server:
        yield server.url


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_eight_processes_four_calls_each_run_the_agent_once(endpoint: str) -> None:
    processes, calls = 8, 4
    token = f"order-{uuid.uuid4().hex[:8]}"  # a token of its own per run (repeatable with --count)
    claims = SPAWN.Value("i", 0)
    gate, entered, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=worker.run, args=(i, endpoint, token, calls, claims, gate, entered, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        # One process's primary is in its model call, and every process has tried its claim: release the model.
        _wait_for(lambda: entered.is_set() and claims.value >= processes, "the claims of all processes")
        gate.set()
        reports = [out.get(timeout=WAIT) for _ in procs]
    finally:
        gate.set()
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
    results = [r for report in reports for r in report["results"]]
    assert len(results) == processes * calls
    assert all(r == STUB_ANSWER + "\n" for r in results), results
    assert sum(r["model_calls"] for r in reports) == 2  # one tool-use cycle, in one process only
    assert sum(r["tool_calls"] for r in reports) == 1
    primaries = [r for r in reports if r["model_calls"]]
    others = [r for r in reports if not r["model_calls"]]
    assert len(primaries) == 1 and len(others) == processes - 1
    assert all(r["replayed"] == calls for r in others)
    # The primary: its claim and its result, and nothing else but its run's journal.
    assert {k: n for k, n in primaries[0]["store_calls"].items() if k != "append"} == {"claim": 1, "complete": 1}
    # Every other process: one claim attempt (a conditional write that fails), then reads until completed.
    assert all(r["store_calls"]["claim"] == 1 and "complete" not in r["store_calls"] for r in others)
    totals: Counter[str] = Counter()
    for r in others:
        totals.update(r["store_calls"])
    print(f"store calls: primary process {primaries[0]['store_calls']}, other processes in total {dict(totals)}")


def test_crashed_primary_is_taken_over_after_a_whole_lease_of_silence_then_runs_once(endpoint: str) -> None:
    lease = 4.0
    token = f"order-crash-{uuid.uuid4().hex[:8]}"  # a token of its own per run (repeatable with --count)
    claims = SPAWN.Value("i", 0)
    gate, entered = SPAWN.Event(), SPAWN.Event()
    crashed = SPAWN.Process(target=worker.hold_claim, args=(endpoint, token, claims, gate, entered, lease))
    crashed.start()
    try:
        _wait_for(entered.is_set, "the doomed primary's model call")
        # While the owner lives (in its model call, heartbeating), a retry with a deadline waits, then gives up,
        # however long that takes: the owner's lease is renewed all along, so no clock decides this.
        impatient, impatient_script, _ = worker.make_agent(endpoint, claims, wait_timeout_seconds=0.5)
        with pytest.raises(IdempotencyWaitTimeoutError):
            impatient(worker.PROMPT, idempotency_token=token)
        assert impatient_script.model_calls == 0
        os.kill(crashed.pid or 0, signal.SIGKILL)
        crashed.join(WAIT)
    finally:
        if crashed.is_alive():
            crashed.kill()
    assert crashed.exitcode == -signal.SIGKILL

    # A patient retry, started after the kill, watches the dead owner's last version for a whole lease of its own
    # clock (no wall clock judges it), takes the claim over, and runs exactly once.
    patient, patient_script, patient_store = worker.make_agent(endpoint, claims)
    started = time.monotonic()
    result = patient(worker.PROMPT, idempotency_token=token)
    elapsed = time.monotonic() - started
    print(f"\nMEASURED a retry started after the kill took over and ran in {elapsed:.2f} s (lease {lease:g} s)")
    assert elapsed >= lease  # never sooner: its first read of the dead claim came after it started
    assert elapsed <= 3 * lease  # about one lease plus a poll, bounded loosely
    assert not isinstance(result, ReplayedAgentResult)
    assert patient_script.model_calls == 2 and patient_script.tool_calls == 1
    assert patient_store.calls["take_over"] == 1 and patient_store.calls["complete"] == 1

    # Later retries replay it.
    later, later_script, _ = worker.make_agent(endpoint, claims)
    assert isinstance(asyncio.run(later.invoke_async(worker.PROMPT, idempotency_token=token)), ReplayedAgentResult)
    assert later_script.model_calls == 0
