"""The step journal: what a crash costs with it and without it, and what it costs when nothing crashes.

1. **A crash.** The turn of ``integ_tests/journal_worker.py`` (four model calls, three tools, a session turn) is
   killed (SIGKILL) inside its second tool, and retried by another process: the model calls and tool runs paid in
   total, with the journal, without it (rolled back and run again), and with upstream's ``strands.Agent`` (no
   idempotency: the retry simply runs again). Redis and DynamoDB (moto server).
2. **No crash.** The same turn run to its end, journal on vs off, in this process: store writes per turn, and wall
   time per turn as a ratio to the journal off, on memory, Redis and DynamoDB (moto server).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servers import LocalServer, moto_server, redis_server

from strands_py import Agent
from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    IdempotencyStore,
    InMemoryIdempotencyStore,
)
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing import CountingStore

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "integ_tests" / "journal_worker.py"
WAIT = 120.0
TABLE = "journal-bench"
WRITES = ("claim", "take_over", "complete", "release", "renew", "append", "truncate")

sys.path.insert(0, str(ROOT / "integ_tests"))
from journal_worker import FourSteps, Ledger  # noqa: E402


@contextmanager
def _servers() -> Iterator[dict[str, dict[str, str]]]:
    redis_srv, moto_srv = redis_server(), moto_server()
    servers: list[LocalServer] = [redis_srv, moto_srv]
    for server in servers:
        server.start()
    try:
        endpoint = f"http://127.0.0.1:{moto_srv.port}"
        with _dynamodb(endpoint) as store:
            store.create_table()
        yield {
            "redis": {"store": "redis", "url": f"redis://127.0.0.1:{redis_srv.port}"},
            "dynamodb": {"store": "dynamodb", "url": endpoint, "table": TABLE},
        }
    finally:
        for server in servers:
            server.stop()


def _dynamodb(endpoint: str) -> DynamoDBIdempotencyStore:
    import boto3

    session = boto3.Session(region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench")
    return DynamoDBIdempotencyStore(TABLE, boto3_session=session, endpoint_url=endpoint)


# -- 1. a crash ----------------------------------------------------------------------------------------------------


def _run_worker(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _reached(ledger: Path, line: str) -> bool:
    return ledger.exists() and line in ledger.read_text()


def _crash(store: dict[str, str], mode: str) -> tuple[int, int]:
    """Kill a turn inside its second tool, retry it in another process: (model calls, tool runs) in total."""
    with tempfile.TemporaryDirectory(prefix="strands-py-journal-bench-") as directory:
        base = {
            **store,
            "sessions": f"{directory}/sessions",
            "ledger": f"{directory}/ledger",
            "token": uuid.uuid4().hex,
            "lease_seconds": 1.0,
            "journal": mode == "journal",
            "upstream": mode == "upstream",
            "uncertain": "report",  # the library's default for a tool that died mid-call
        }
        dead_config, retry_config = Path(directory, "a.json"), Path(directory, "b.json")
        dead_config.write_text(json.dumps({**base, "stop_at": "tool:pay_b"}))
        retry_config.write_text(json.dumps(base))
        dead = _run_worker(dead_config)
        deadline = time.monotonic() + WAIT
        while not _reached(Path(base["ledger"]), "stopped tool:pay_b"):
            if dead.poll() is not None or time.monotonic() > deadline:
                dead.kill()
                raise RuntimeError(f"the first process never reached its second tool: {dead.communicate()[1][-2000:]}")
            time.sleep(0.05)
        os.kill(dead.pid, signal.SIGKILL)
        dead.communicate(timeout=WAIT)
        retry = _run_worker(retry_config)
        _, err = retry.communicate(timeout=WAIT)
        if retry.returncode != 0:
            raise RuntimeError(f"the retry failed: {err[-2000:]}")
        lines = [line.split(" ", 1)[1] for line in Path(base["ledger"]).read_text().splitlines()]
        return sum(line.startswith("model ") for line in lines), sum(line.startswith("tool ") for line in lines)


def run_crash(stores: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for name, store in stores.items():
        for mode in ("journal", "no journal", "upstream"):
            models, tools = _crash(store, mode)
            rows.append(
                {"scenario": "journal crash", "store": name, "impl": mode, "model_calls": models, "tool_runs": tools}
            )
    return rows


# -- 2. no crash ---------------------------------------------------------------------------------------------------


def _turn_agent(store: IdempotencyStore, journal: bool, ledger: str) -> Agent:
    script = FourSteps(Ledger(ledger), None)
    config = IdempotencyConfig(store=store, scope="journal-bench", journal=journal)
    return Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=config)


async def _turns(make_agent: Callable[[], Agent], turns: int) -> float:
    """Seconds for ``turns`` turns, each on a fresh agent (one per request, as servers build them)."""
    agents = [make_agent() for _ in range(turns)]
    started = time.perf_counter()
    for agent in agents:
        await agent.invoke_async("Pay a, b and c.", idempotency_token=uuid.uuid4().hex)
    return time.perf_counter() - started


def _fault_free(store_factory: Callable[[], IdempotencyStore], turns: int, reps: int) -> list[dict[str, Any]]:
    seconds: dict[bool, list[float]] = {True: [], False: []}
    writes: dict[bool, float] = {}
    for rep in range(reps):
        # Interleaved, in alternating order, so that drift and warm-up on a shared machine touch both alike.
        for journal in (False, True) if rep % 2 == 0 else (True, False):
            counting = CountingStore(store_factory())
            with tempfile.NamedTemporaryFile(prefix="strands-py-journal-bench-") as ledger:
                make = functools.partial(_turn_agent, counting, journal, ledger.name)

                seconds[journal].append(asyncio.run(_turns(make, turns)) / turns)
            writes[journal] = sum(counting.calls[w] for w in WRITES) / turns
    off = statistics.median(seconds[False])
    return [
        {
            "impl": "journal" if journal else "no journal",
            "writes_per_turn": writes[journal],
            "ms_per_turn": statistics.median(seconds[journal]) * 1000,
            "ratio": statistics.median(seconds[journal]) / off,
        }
        for journal in (False, True)
    ]


def run_fault_free(stores: dict[str, dict[str, str]], *, turns: int, reps: int) -> list[dict[str, Any]]:
    factories: dict[str, Callable[[], IdempotencyStore]] = {
        "memory": InMemoryIdempotencyStore,
        "redis": lambda: RedisIdempotencyStore.from_url(stores["redis"]["url"]),
        "dynamodb": lambda: _dynamodb(stores["dynamodb"]["url"]),
    }
    rows = []
    for name, factory in factories.items():
        # moto's TransactWriteItems copies the whole table: its cost grows with the table (real DynamoDB's does not),
        # so DynamoDB gets a tenth of the turns, and its times say little beyond the writes they count.
        count = max(5, turns // 10) if name == "dynamodb" else turns
        for row in _fault_free(factory, count, reps):
            rows.append({"scenario": "journal cost", "store": name, "turns": count, **row})
    return rows


def run_journal(*, quick: bool) -> list[dict[str, Any]]:
    with _servers() as stores:
        return run_crash(stores) + run_fault_free(stores, turns=20 if quick else 100, reps=3 if quick else 5)


def markdown(rows: list[dict[str, Any]]) -> str:
    crash = [r for r in rows if r["scenario"] == "journal crash"]
    cost = [r for r in rows if r["scenario"] == "journal cost"]
    out = ["| store | implementation | model calls in total | tool runs in total |", "|---|---|---:|---:|"]
    out += [f"| {r['store']} | {r['impl']} | {r['model_calls']} | {r['tool_runs']} |" for r in crash]
    out += [
        "",
        "| store | implementation | store writes per turn | ms per turn | ratio to no journal |",
        "|---|---|---:|---:|---:|",
    ]
    out += [
        f"| {r['store']} | {r['impl']} | {r['writes_per_turn']:.1f} | {r['ms_per_turn']:.1f} | {r['ratio']:.2f} |"
        for r in cost
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(run_journal(quick="--quick" in sys.argv)))
