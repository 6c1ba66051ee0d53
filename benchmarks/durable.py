"""Scenario 5: the durable layer's store calls and time per invocation, beside aws-lambda-powertools.

Both do the same job on the same moto server (127.0.0.1, a random free port): run an agent once per request
and replay its answer to retries. strands-py: ``Agent(idempotency=IdempotencyConfig(store=...))`` with the
in-memory store and with DynamoDB. Powertools: ``@idempotent_function`` around a plain ``strands.Agent`` call,
with its ``DynamoDBPersistenceLayer``. DynamoDB calls are counted on each client with botocore's ``before-call``
event, so retries inside botocore would not inflate them.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import boto3
import strands
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency import (
    IdempotencyConfig as PowertoolsConfig,
)
from moto.server import ThreadedMotoServer

from strands_py import Agent
from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

PROMPT = "What is the weather in Paris?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counted_client(endpoint: str) -> tuple[Any, Counter[str]]:
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client.meta.events.register("before-call.dynamodb", count)
    return client, calls


def _create_table(client: Any, name: str) -> None:
    client.create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )


def _ours(store: Any) -> tuple[Callable[[str], str], ScriptedBedrock]:
    script = ScriptedBedrock()
    agent = Agent(
        model=script.model(), tools=script.tools(), callback_handler=None, idempotency=IdempotencyConfig(store=store)
    )

    def call(token: str) -> str:
        return str(agent(PROMPT, idempotency_token=token))

    return call, script


def _powertools(client: Any, table: str) -> tuple[Callable[[str], str], ScriptedBedrock]:
    script = ScriptedBedrock()
    agent = strands.Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    persistence = DynamoDBPersistenceLayer(table_name=table, boto3_client=client)
    config = PowertoolsConfig(event_key_jmespath="token", payload_validation_jmespath="prompt")

    @idempotent_function(data_keyword_argument="request", persistence_store=persistence, config=config)
    def handle(request: dict[str, str]) -> dict[str, str]:
        return {"text": str(agent(request["prompt"]))}

    def call(token: str) -> str:
        return handle(request={"token": token, "prompt": PROMPT})["text"]

    return call, script


def _phase(call: Callable[[str], str], tokens: list[str], calls: Counter[str]) -> tuple[float, dict[str, float]]:
    before = Counter(calls)
    started = time.perf_counter()
    for token in tokens:
        call(token)
    seconds = (time.perf_counter() - started) / len(tokens)
    delta = Counter(calls)
    delta.subtract(before)
    return seconds, {op: n / len(tokens) for op, n in sorted(delta.items()) if n}


def run_durable(
    n: int, reps: int, record: Callable[..., dict[str, Any]], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    # moto's server logs every request, failed conditional writes (the claims that find a record) included.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        admin, _ = _counted_client(endpoint)
        _create_table(admin, "strands-py-idempotency")
        _create_table(admin, "powertools-idempotency")
        ours_client, ours_calls = _counted_client(endpoint)
        pt_client, pt_calls = _counted_client(endpoint)
        memory = CountingStore(InMemoryIdempotencyStore())
        impls: list[tuple[str, str, Callable[[str], str], ScriptedBedrock, Counter[str]]] = []
        for store_name, store, calls in (
            ("memory", memory, memory.calls),
            ("dynamodb", DynamoDBIdempotencyStore("strands-py-idempotency", client=ours_client), ours_calls),
        ):
            call, script = _ours(store)
            impls.append(("strands-py", store_name, call, script, calls))
        call, script = _powertools(pt_client, "powertools-idempotency")
        impls.append(("powertools", "dynamodb", call, script, pt_calls))

        for impl, store_name, call, script, calls in impls:
            for phase in ("primary", "replay"):
                times: list[float] = []
                per_call: dict[str, float] = {}
                model_calls_before = script.model_calls
                for rep in range(reps):
                    tokens = [f"{impl}-{store_name}-{rep}-{i}" for i in range(n)]
                    if phase == "replay":
                        for token in tokens:  # not timed: the first run of each request
                            call(token)
                    seconds, per_call = _phase(call, tokens, calls)
                    times.append(seconds)
                model_calls = script.model_calls - model_calls_before
                rows.append(
                    record(
                        f"durable-{store_name}-{phase}",
                        n,
                        impl,
                        seconds=statistics.median(times),
                        completed=True,
                        model_calls=model_calls,
                        store_calls=per_call,
                        note=f"{statistics.median(times) * 1e3:.2f} ms per invocation; store calls per invocation "
                        + ", ".join(f"{op} {v:g}" for op, v in per_call.items()),
                    )
                )
                progress(f"durable {store_name} {phase} {impl}: {statistics.median(times) * 1e3:.2f} ms, {per_call}")
    finally:
        server.stop()
    for row in rows:
        reference = next(
            (r for r in rows if r["impl"] == "powertools" and r["scenario"].endswith(row["scenario"].split("-")[-1])),
            None,
        )
        if reference is not None and row["scenario"].startswith("durable-dynamodb"):
            row["ratio"] = row["seconds"] / reference["seconds"]
            row["reference"] = "powertools"
    return rows
