"""Scenario 5: the durable layer beside aws-lambda-powertools, on DynamoDB (moto server) and on Redis (redis-server).

Both do the same job: run an agent once per request and replay its answer to retries, with a sync call per request.
strands-py: ``Agent(idempotency=IdempotencyConfig(store=...))``, called as ``agent(prompt, idempotency_token=...)``.
Powertools: ``@idempotent_function`` around a plain ``strands.Agent`` call, with its ``DynamoDBPersistenceLayer``
or its ``RedisCachePersistenceLayer``. The in-memory store (strands-py only) shows the gate's cost without I/O.

How it is measured:
- Each repetition runs n new requests (``primary``), then the same n again (``replay``). The implementations are
  interleaved call by call, in alternating order each repetition, so both see the same machine at the same moment.
  Figures per call are medians over the repetitions; ``ratio`` is against Powertools on the same store and phase.
- ``client CPU``: CPU time of this process per call (``time.process_time``): the client's own work, without the
  wait for the server. ``server``: what the store spent per call. moto: the CPU time of its process (each
  implementation has a moto server of its own, same version and settings, so each server's CPU is attributable);
  Redis: both share one server, and the time is its command execution time (``INFO commandstats``, the
  implementations use disjoint commands).
- Each implementation is built as its users get it by default: strands-py's stores create their own clients
  (``DynamoDBIdempotencyStore(table, endpoint_url=...)``, ``RedisIdempotencyStore.from_url``); Powertools is given
  the client it would create itself (a plain ``dynamodb`` client; for Redis, ``decode_responses=True`` as its
  documentation shows).
- Store calls are round trips: botocore's ``before-call`` event on each implementation's session for DynamoDB
  (botocore's own retries would not inflate them); for Redis, the calls of the commands each implementation sends
  (``INFO commandstats``; strands-py sends ``EVALSHA``, Powertools ``SET``/``GET``; commands run inside a script
  are not round trips and are not counted).
- Payload validation: both validate on DynamoDB (the same prompt checked against the stored request). On Redis,
  Powertools runs without it (``VALIDATE_ON_REDIS``: its Redis layer drops the validation hash when it completes a
  record, so every replay would fail), strands-py with it: on Redis ours does strictly more work per call.
- moto's backend is not atomic under concurrent requests; it need not be serialised here because every call is
  sequential (one request at a time, whichever the implementation).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import redis
import strands
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer, idempotent_function
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig as PowertoolsConfig
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from servers import LocalServer, moto_server, redis_server, start_all

from strands_py import Agent
from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    IdempotencyStore,
    InMemoryIdempotencyStore,
)
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Powertools flags its Redis client protocol as deprecated
    from aws_lambda_powertools.utilities.idempotency.persistence.redis import RedisCachePersistenceLayer

PROMPT = "What is the weather in Paris?"
PHASES = ("primary", "replay")
# Powertools 3.x's Redis layer drops the payload hash when it completes a record, so with payload validation every
# replay fails (IdempotencyValidationError). On Redis it runs without validation; strands-py validates everywhere.
VALIDATE_ON_REDIS = False
# Redis commands each implementation sends, whose calls and server time are read from INFO commandstats. Disjoint:
# strands-py sends only scripts (which run HGET, HSET, DEL, ... inside), Powertools only SET and GET here (it sends
# DEL when the function fails, which never happens in this benchmark, and which strands-py's scripts run too).
REDIS_COMMANDS = {"strands-py": ("evalsha", "eval", "script|load"), "powertools": ("set", "get")}


@dataclass
class Impl:
    """One implementation on one store: a sync call per request, and what it cost."""

    name: str
    store: str
    call: Callable[[str], str]
    script: ScriptedBedrock
    store_calls: Callable[[], Counter[str]]  # round trips so far, by operation
    server_seconds: Callable[[], float] | None = None  # the store server's time spent for this implementation


@dataclass
class _Phase:
    wall: float = 0.0
    cpu: float = 0.0
    server: float | None = None
    calls: dict[str, float] = field(default_factory=dict)
    model_calls: int = 0


def _ours(store_name: str, store: IdempotencyStore, store_calls: Callable[[], Counter[str]]) -> Impl:
    script = ScriptedBedrock()
    agent = Agent(
        model=script.model(), tools=script.tools(), callback_handler=None, idempotency=IdempotencyConfig(store=store)
    )

    def call(token: str) -> str:
        return str(agent(PROMPT, idempotency_token=token))

    return Impl("strands-py", store_name, call, script, store_calls)


def _powertools(
    store_name: str, persistence: BasePersistenceLayer, store_calls: Callable[[], Counter[str]], *, validate: bool
) -> Impl:
    script = ScriptedBedrock()
    agent = strands.Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    config = PowertoolsConfig(event_key_jmespath="token", payload_validation_jmespath="prompt" if validate else "")

    @idempotent_function(data_keyword_argument="request", persistence_store=persistence, config=config)
    def handle(request: dict[str, str]) -> dict[str, str]:
        return {"text": str(agent(request["prompt"]))}

    def call(token: str) -> str:
        return handle(request={"token": token, "prompt": PROMPT})["text"]

    return Impl("powertools", store_name, call, script, store_calls)


# --- stores: each implementation as its users get it by default, on the same kind of server -------------------


def counting_session(calls: Counter[str]) -> boto3.Session:
    """A boto3 session whose DynamoDB clients count their calls (botocore's ``before-call``, before any retry)."""
    session = boto3.Session(aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1")

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    session.events.register("before-call.dynamodb", count)
    return session


def create_table(server: LocalServer) -> str:
    endpoint = f"http://127.0.0.1:{server.port}"
    admin = counting_session(Counter()).client("dynamodb", endpoint_url=endpoint)
    admin.create_table(
        TableName="idempotency",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return endpoint


@contextlib.contextmanager
def dynamodb_impls() -> Iterator[list[Impl]]:
    ours_server, powertools_server = moto_server(), moto_server()
    start_all(ours_server, powertools_server)
    try:
        # strands-py: the store's own client (its default botocore config), from a session that counts.
        ours_calls: Counter[str] = Counter()
        endpoint = create_table(ours_server)
        store = DynamoDBIdempotencyStore(
            "idempotency", boto3_session=counting_session(ours_calls), endpoint_url=endpoint
        )
        ours = _ours("dynamodb", store, lambda: Counter(ours_calls))
        ours.server_seconds = ours_server.cpu_seconds
        # Powertools: what it builds by default (session.client("dynamodb") without a config), on its endpoint.
        powertools_calls: Counter[str] = Counter()
        endpoint = create_table(powertools_server)
        client = counting_session(powertools_calls).client("dynamodb", endpoint_url=endpoint)
        persistence = DynamoDBPersistenceLayer("idempotency", boto3_client=client)
        powertools = _powertools("dynamodb", persistence, lambda: Counter(powertools_calls), validate=True)
        powertools.server_seconds = powertools_server.cpu_seconds
        yield [ours, powertools]
        store.close()
    finally:
        ours_server.stop()
        powertools_server.stop()


@contextlib.contextmanager
def redis_impls() -> Iterator[list[Impl]]:
    with redis_server() as server:
        url = f"redis://127.0.0.1:{server.port}"
        admin = redis.Redis.from_url(url)
        store = RedisIdempotencyStore.from_url(url)
        ours = _ours("redis", store, commandstats(admin, "strands-py", "calls"))
        # Powertools reads its records as JSON text: a client decoding responses, as its documentation shows.
        client = redis.Redis.from_url(url, decode_responses=True)
        persistence = RedisCachePersistenceLayer(client=client)
        powertools = _powertools(
            "redis", persistence, commandstats(admin, "powertools", "calls"), validate=VALIDATE_ON_REDIS
        )
        for impl in (ours, powertools):
            usec = commandstats(admin, impl.name, "usec")
            impl.server_seconds = lambda usec=usec: sum(usec().values()) / 1e6
        yield [ours, powertools]
        store.close()
        client.close()
        admin.close()


def commandstats(admin: redis.Redis, impl: str, stat: str) -> Callable[[], Counter[str]]:
    """``INFO commandstats``: ``calls`` or ``usec`` of the commands ``impl`` sends (not those its scripts run)."""

    def read() -> Counter[str]:
        stats = admin.info("commandstats")
        return Counter({c.upper(): int(stats.get(f"cmdstat_{c}", {}).get(stat, 0)) for c in REDIS_COMMANDS[impl]})

    return read


@contextlib.contextmanager
def memory_impls() -> Iterator[list[Impl]]:
    store = CountingStore(InMemoryIdempotencyStore())
    yield [_ours("memory", store, lambda: Counter(store.calls))]


# --- measurement -----------------------------------------------------------------------------------------------


def _interleaved(impls: list[Impl], tokens: list[str]) -> dict[str, _Phase]:
    """Call every implementation once per token, alternating; per-call wall time, client CPU, server, store calls."""
    phases = {impl.name: _Phase() for impl in impls}
    calls_before = {impl.name: impl.store_calls() for impl in impls}
    model_before = {impl.name: impl.script.model_calls for impl in impls}
    server_before = {impl.name: impl.server_seconds() for impl in impls if impl.server_seconds is not None}
    for token in tokens:
        for impl in impls:
            phase = phases[impl.name]
            cpu, wall = time.process_time(), time.perf_counter()
            impl.call(token)
            phase.wall += time.perf_counter() - wall
            phase.cpu += time.process_time() - cpu
    n = len(tokens)
    for impl in impls:
        phase = phases[impl.name]
        phase.wall /= n
        phase.cpu /= n
        if impl.server_seconds is not None:
            phase.server = (impl.server_seconds() - server_before[impl.name]) / n
        delta = impl.store_calls()
        delta.subtract(calls_before[impl.name])
        phase.calls = {op: count / n for op, count in sorted(delta.items()) if count}
        phase.model_calls = impl.script.model_calls - model_before[impl.name]
    return phases


def _compare(
    impls: list[Impl], n: int, reps: int, record: Callable[..., dict[str, Any]], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    store = impls[0].store
    for impl in impls:  # warm up: first-call costs (connections, script loading, imports) are not per call
        impl.call(f"warm-up-{impl.name}")
        impl.call(f"warm-up-{impl.name}")
    samples: dict[tuple[str, str], list[_Phase]] = {}
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        tokens = [f"{store}-{rep}-{i}" for i in range(n)]
        for phase in PHASES:  # the replay phase repeats the primary phase's tokens, now completed
            for name, measured in _interleaved(order, tokens).items():
                samples.setdefault((name, phase), []).append(measured)
    rows: list[dict[str, Any]] = []
    for phase in PHASES:
        for impl in impls:
            measured = samples[(impl.name, phase)]
            servers = [m.server for m in measured if m.server is not None]
            per_call = measured[-1].calls
            row = record(
                f"durable-{store}-{phase}",
                n,
                impl.name,
                seconds=statistics.median(m.wall for m in measured),
                client_cpu_ms=statistics.median(m.cpu for m in measured) * 1e3,
                server_ms=statistics.median(servers) * 1e3 if servers else None,
                completed=True,
                model_calls=sum(m.model_calls for m in measured),
                store_calls=per_call,
            )
            rows.append(row)
            progress(
                f"durable {store} {phase} {impl.name}: {row['seconds'] * 1e3:.2f} ms, "
                f"client CPU {row['client_cpu_ms']:.2f} ms, {per_call}"
            )
        reference = next((r for r in rows[-len(impls) :] if r["impl"] == "powertools"), None)
        for row in rows[-len(impls) :]:
            if reference is not None:
                row["ratio"] = row["seconds"] / reference["seconds"]
                row["reference"] = "powertools"
    return rows


def run_durable(
    n: int, reps: int, record: Callable[..., dict[str, Any]], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    # Powertools warns on every call outside Lambda (no remaining-time context); moto's server logs every request.
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    for impls in (memory_impls, dynamodb_impls, redis_impls):
        with impls() as measured:
            rows += _compare(measured, n, reps, record, progress)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | n | impl | ms per call | client CPU ms | server ms | store calls per call | model calls "
        "| ratio |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if not r["scenario"].startswith("durable-"):
            continue
        calls = ", ".join(f"{op} {v:g}" for op, v in (r["store_calls"] or {}).items()) or "none"
        server = "—" if r["server_ms"] is None else f"{r['server_ms']:.2f}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['scenario']} | {r['n']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | {r['client_cpu_ms']:.2f} | "
            f"{server} | {calls} | {r['model_calls']} | {ratio} |"
        )
    return "\n".join(lines)
