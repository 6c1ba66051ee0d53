"""Many OS processes, one DynamoDB table (moto server on 127.0.0.1): one token runs once, everywhere."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import distributed_worker as worker
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from strands_py.idempotency import IdempotencyWaitTimeoutError, ReplayedAgentResult
from strands_py.testing.bedrock import STUB_ANSWER

pytestmark = pytest.mark.racing
WAIT = 60.0
SPAWN = multiprocessing.get_context("spawn")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SerialMotoServer:
    """moto's server app, serving one request at a time on 127.0.0.1.

    moto's own ThreadedMotoServer handles requests on concurrent threads, and its DynamoDB backend has no lock:
    two conditional PutItems can both pass their condition, which real DynamoDB never allows (each write to an
    item is atomic). Seen here: two processes both claimed one token. Serving requests one at a time restores
    DynamoDB's atomicity; the werkzeug server then speaks HTTP/1.0, so no client can hold the connection.
    """

    def __init__(self, port: int) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", port, app, threaded=False, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(WAIT)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto server on a random free loopback port, with the table created; stopped after the module."""
    port = _free_port()
    server = SerialMotoServer(port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    store = worker.counting_store(url, SPAWN.Value("i", 0)).inner
    assert isinstance(store, worker.DynamoDBIdempotencyStore)
    store.create_table()
    store.close()
    yield url
    server.stop()


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
    assert primaries[0]["store_calls"] == {"claim": 1, "complete": 1}
    # Every other process: one claim attempt (a conditional write that fails), then reads until completed.
    assert all(r["store_calls"]["claim"] == 1 and "complete" not in r["store_calls"] for r in others)
    totals: Counter[str] = Counter()
    for r in others:
        totals.update(r["store_calls"])
    print(f"store calls: primary process {primaries[0]['store_calls']}, other processes in total {dict(totals)}")


def test_crashed_primary_blocks_until_its_lease_lapses_then_runs_once(endpoint: str) -> None:
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
        killed_at = time.time()
        os.kill(crashed.pid or 0, signal.SIGKILL)
        crashed.join(WAIT)
    finally:
        if crashed.is_alive():
            crashed.kill()
    assert crashed.exitcode == -signal.SIGKILL

    # A patient retry waits for the lease to lapse, takes the claim over, and runs exactly once. The owner's last
    # renewal was at most a third of a lease before the kill, so the lease lapsed two thirds of a lease after it.
    patient, patient_script, patient_store = worker.make_agent(endpoint, claims)
    result = patient(worker.PROMPT, idempotency_token=token)
    assert time.time() >= killed_at + lease * 2 / 3
    assert not isinstance(result, ReplayedAgentResult)
    assert patient_script.model_calls == 2 and patient_script.tool_calls == 1
    assert patient_store.calls["complete"] == 1

    # Later retries replay it.
    later, later_script, _ = worker.make_agent(endpoint, claims)
    assert isinstance(asyncio.run(later.invoke_async(worker.PROMPT, idempotency_token=token)), ReplayedAgentResult)
    assert later_script.model_calls == 0
