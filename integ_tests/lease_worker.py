"""Runs in a separate OS process (multiprocessing, spawn) for test_leases.py: one durable invocation, observed.

A process is started ahead of need (``serve``: spawn and imports take seconds) and given one job: it builds its agent
(a real ``BedrockModel`` with a scripted boto3 client, a ``pay`` tool that reads its tool-call idempotency key, a
DynamoDB store on the test's moto server), says it is ready, waits for the test's ``go`` and makes its call(s). The
test follows it through a ``Probe`` of multiprocessing primitives (its claim, every renewal, its model calls, the
keys its tool saw) and, unless the process is killed, gets a report.
"""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import json
import queue
import time
from typing import Any

import boto3
from botocore.config import Config
from strands import ToolContext, tool

from strands_py import Agent, tool_idempotency_key
from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    RecordState,
    _context,
    _heartbeat,
)
from strands_py.testing.bedrock import ScriptedBedrock, _ScriptedEventStream, _text_chunks

TABLE = "agent-idempotency-leases"
SCOPE = "integ-payment-agent"
PROMPT = "Pay the 5 euro invoice."
TOOL = "pay"
TOOL_INPUT = {"cents": 500}
WAIT = 60.0
# A warm process nobody gave a job to exits after this long (the test module kills it sooner).
IDLE_SECONDS = 600.0
# Longer than any job takes, shorter than the test waits for a report (30 s).
HANG_SECONDS = 25.0
HEARTBEAT_TASK = "strands-py-heartbeat"
WRITES = ("PutItem", "UpdateItem", "DeleteItem")
# Room for a record version (``new_version()``: 16 hex digits and a counter).
VERSION_BYTES = 64


class Probe:
    """One worker process as the test sees it. Picklable only when the process is spawned (it is its argument).

    Times are ``time.monotonic()``: on Linux one clock for every process of the machine (``CLOCK_MONOTONIC``), so the
    test compares them across processes, and no wall clock decides anything.

    Queues: ``jobs`` (the one call the process makes, sent by the test), ``keys`` (the key of every tool call),
    ``out`` (the report). Events: ``ready`` (agent built), ``go`` (the test lets it call), ``gate`` (releases gated
    model calls), ``entered`` (a gated model call started), ``renewed`` (set after every successful renewal; the
    test clears it). Values: ``claim_attempts``, ``renewals`` (successful ones), ``claimed_at`` (when our winning
    claim or takeover returned, 0 if never), ``version`` and ``written_at`` (the version of our last successful
    claim, takeover or renewal, and when it was sent: a waiter may judge us gone only a whole lease after that),
    ``judged_version`` and ``judged_seen_at`` (the version our takeover replaced, and when we first read it),
    ``took_over_at`` (when our winning takeover was sent), ``model_started_at`` (our first model call).
    """

    def __init__(self, ctx: Any) -> None:
        self.jobs, self.keys, self.out = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.ready, self.go, self.gate, self.entered, self.renewed = (ctx.Event() for _ in range(5))
        self.claim_attempts = ctx.Value("i", 0)
        self.renewals = ctx.Value("i", 0)
        self.claimed_at = ctx.Value("d", 0.0)
        self.version, self.judged_version = ctx.Array("c", VERSION_BYTES), ctx.Array("c", VERSION_BYTES)
        self.written_at = ctx.Value("d", 0.0)
        self.judged_seen_at = ctx.Value("d", 0.0)
        self.took_over_at = ctx.Value("d", 0.0)
        self.model_started_at = ctx.Value("d", 0.0)


class ObservedStore(IdempotencyStore):
    """Forwards to ``inner``; logs every primitive (name, sent, done, outcome: monotonic times) and publishes our
    claims, takeovers and renewals on the probe, with when we first read each version of another owner's claim.

    Journals are not forwarded (``supports_journal`` stays False): these tests are about claims and leases, and a
    takeover here runs the invocation again (its tool too), as it does on a store without journals."""

    def __init__(self, inner: IdempotencyStore, probe: Probe) -> None:
        self.inner = inner
        self.max_result_bytes = inner.max_result_bytes
        self.probe = probe
        self.log: list[tuple[str, float, float, Any]] = []
        self.first_seen: dict[str, float] = {}

    def _logged(self, name: str, sent: float, outcome: Any) -> None:
        self.log.append((name, sent, time.monotonic(), outcome))

    def _seen(self, record: IdempotencyRecord | None) -> None:
        if record is not None and record.state is RecordState.IN_PROGRESS:
            self.first_seen.setdefault(record.version, time.monotonic())

    def _wrote(self, version: str, sent: float) -> None:
        self.probe.version.value = version.encode()
        self.probe.written_at.value = sent

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        sent = time.monotonic()
        existing = await self.inner.claim(record, now)
        self._seen(existing)
        if existing is None:
            self.probe.claimed_at.value = time.monotonic()
            self._wrote(record.version, sent)
        with self.probe.claim_attempts.get_lock():
            self.probe.claim_attempts.value += 1
        self._logged("claim", sent, existing is None)
        return existing

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        sent = time.monotonic()
        won = await self.inner.take_over(record, version)
        if won:
            self.probe.claimed_at.value = time.monotonic()
            self.probe.took_over_at.value = sent
            self.probe.judged_version.value = version.encode()
            self.probe.judged_seen_at.value = self.first_seen.get(version, 0.0)
            self._wrote(record.version, sent)
        self._logged("take_over", sent, won)
        return won

    async def get(self, key: str) -> IdempotencyRecord | None:
        sent = time.monotonic()
        record = await self.inner.get(key)
        self._seen(record)
        self._logged("get", sent, None if record is None else record.state.value)
        return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        sent = time.monotonic()
        done = await self.inner.complete(record)
        self._logged("complete", sent, done)
        return done

    async def release(self, key: str, owner: str) -> bool:
        sent = time.monotonic()
        done = await self.inner.release(key, owner)
        self._logged("release", sent, done)
        return done

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
        done = await self.inner.renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )
        self._logged("renew", sent, done)
        if done:
            self._wrote(version, sent)
            with self.probe.renewals.get_lock():
                self.probe.renewals.value += 1
            self.probe.renewed.set()
        return done


def _pay_chunks(tool_use_id: str) -> list[dict[str, Any]]:
    return [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockStart": {"start": {"toolUse": {"toolUseId": tool_use_id, "name": TOOL}}, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(TOOL_INPUT)}}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": {"inputTokens": 20, "outputTokens": 8, "totalTokens": 28}, "metrics": {"latencyMs": 1}}},
    ]


class PaymentScript(ScriptedBedrock):
    """First model call asks for ``pay`` (unless ``with_tool`` is off), the next answers ``answer``.

    Model calls numbered ``gate_from`` and later (from 1; 0: none) set ``entered`` and wait for the gate. The model's
    tool-use ids differ per process, as a real model's would: a tool key must not depend on them.
    """

    def __init__(self, label: str, probe: Probe, *, gate_from: int, with_tool: bool) -> None:
        super().__init__(answer=f"answer from {label}", with_tool=with_tool, gate=None, entered=probe.entered)
        self.label = label
        self.probe = probe
        self.gate_from = gate_from

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        with self._mutex:
            self.model_calls += 1
            number = self.model_calls
        if number == 1:
            self.probe.model_started_at.value = time.monotonic()
        if self.gate_from and number >= self.gate_from:
            self.entered.set()
            if not self.probe.gate.wait(WAIT):
                raise TimeoutError(f"model gate stayed closed for {WAIT}s")
        last = request.get("messages", [])[-1]
        if self.with_tool and not any("toolResult" in block for block in last.get("content", [])):
            return {"stream": _ScriptedEventStream(_pay_chunks(f"tooluse-{self.label}-{number}"))}
        return {"stream": _ScriptedEventStream(_text_chunks(self.answer))}

    def tools(self) -> list[Any]:
        script = self

        @tool(context=True)
        def pay(cents: int, tool_context: ToolContext) -> str:
            """Pay an amount, forwarding the call's idempotency key to the payment service.

            Args:
                cents: The amount.
            """
            key = tool_idempotency_key(tool_context)
            with script._mutex:
                script.tool_calls += 1
            script.probe.keys.put((script.label, key))
            return f"paid {cents} cents"

        return [pay]


def _client(endpoint: str, operations: list[tuple[str, float]]) -> Any:
    """A DynamoDB client like the store's default one, recording every API call (name, monotonic time)."""
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "total_max_attempts": 5}, connect_timeout=5, read_timeout=10),
    )

    def record(model: Any, **_: Any) -> None:
        operations.append((model.name, time.monotonic()))

    client.meta.events.register("before-call.dynamodb", record)
    return client


def _break(broken: str | None) -> None:
    """The broken variants the negative controls run (each one undoes a guarantee in this process only)."""
    if broken == "no-heartbeats":
        _heartbeat._Lease.start = lambda self: None  # type: ignore[method-assign]
    elif broken == "ignores-lease-loss":
        _heartbeat._Lease._lose = lambda self, reason: None  # type: ignore[method-assign]
        _heartbeat._Lease.expired_locally = lambda self: False  # type: ignore[method-assign]
    elif broken == "keys-from-tool-use-id":
        _context._RunContext.key_for = lambda self, tool_use: hashlib.sha256(  # type: ignore[method-assign]
            str(tool_use["toolUseId"]).encode()
        ).hexdigest()
    elif broken is not None:
        raise ValueError(broken)


def serve(endpoint: str, probe: Probe) -> None:
    """A warm process: everything is imported; waits (bounded) for its one job, then runs it.

    A job still running after ``HANG_SECONDS`` prints every thread's stack to stderr (the test's output), before the
    test gives up on its report.
    """
    try:
        job = probe.jobs.get(timeout=IDLE_SECONDS)
    except queue.Empty:
        return
    label, token, options = job
    faulthandler.dump_traceback_later(HANG_SECONDS)
    try:
        run(label, endpoint, token, probe, **options)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run(
    label: str,
    endpoint: str,
    token: str,
    probe: Probe,
    *,
    lease_seconds: float,
    gate_from: int = 0,
    with_tool: bool = True,
    hmac_key: bytes | None = None,
    broken: str | None = None,
    calls: int = 1,
) -> None:
    """``calls`` concurrent calls with ``token``; reports the outcomes on ``probe.out`` (unless killed first)."""
    _break(broken)
    operations: list[tuple[str, float]] = []
    script = PaymentScript(label, probe, gate_from=gate_from, with_tool=with_tool)
    dynamodb = DynamoDBIdempotencyStore(TABLE, client=_client(endpoint, operations))
    store = ObservedStore(dynamodb, probe)
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope=SCOPE, lease_seconds=lease_seconds, hmac_key=hmac_key),
    )
    probe.ready.set()
    if not probe.go.wait(WAIT):
        raise TimeoutError("the test never said go")

    async def call() -> dict[str, Any]:
        try:
            result = await asyncio.wait_for(agent.invoke_async(PROMPT, idempotency_token=token), WAIT)
        except Exception as e:  # reported to the test, which asserts on it
            return {"error": type(e).__name__, "message": str(e)}
        return {"result": str(result).strip(), "replayed": type(result).__name__ == "ReplayedAgentResult"}

    async def main() -> dict[str, Any]:
        started = time.monotonic()
        # The first call is the primary; the others are its duplicates in this process.
        outcomes = await asyncio.gather(*(call() for _ in range(calls)))
        ended = time.monotonic()
        # Whatever way the invocation ended, its heartbeat must be gone with it.
        heartbeats = [t for t in asyncio.all_tasks() if t.get_name() == HEARTBEAT_TASK and not t.done()]
        return {
            **outcomes[0],
            "outcomes": outcomes,
            "started": started,
            "ended": ended,
            "heartbeats_left": len(heartbeats),
        }

    try:
        report = asyncio.run(main())
    finally:
        dynamodb.close()
    probe.out.put(
        {
            "label": label,
            **report,
            "model_calls": script.model_calls,
            "tool_calls": script.tool_calls,
            "store_log": store.log,
            "operations": operations,
        }
    )
