"""OpenTelemetry signals, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from strands_py import Agent, IdempotencyAbortedError, telemetry
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyKeyMismatchError,
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyWaitTimeoutError,
    InMemoryIdempotencyStore,
    RecordState,
)
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.testing import CountingStore
from strands_py.testing.bedrock import ScriptedBedrock

WAIT = 10.0
TOKEN = "user-7731-order-secret"
P = telemetry.PREFIX


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("strands_py"))
    yield exporter
    provider.shutdown()


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _events(span: ReadableSpan) -> dict[str, dict[str, Any]]:
    return {e.name: dict(e.attributes or {}) for e in span.events}


def _assert_no_raw_token(exporter: InMemorySpanExporter) -> None:
    for span in exporter.get_finished_spans():
        values = [*dict(span.attributes or {}).values()]
        values += [v for e in span.events for v in dict(e.attributes or {}).values()]
        assert all(TOKEN not in str(v) for v in values), span.name


async def _duplicate_of_gated_primary(agent: Agent, script: ScriptedBedrock, gate: threading.Event) -> Any:
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token=TOKEN))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token=TOKEN))
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the duplicate to wait")
    return primary, dup


async def test_duplicate_span_records_detection_and_wait(spans: InMemorySpanExporter) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    primary, dup = await _duplicate_of_gated_primary(agent, script, gate)
    gate.set()
    await asyncio.wait_for(asyncio.gather(primary, dup), WAIT)
    (span,) = _named(spans, telemetry.SPAN_DUPLICATE)
    assert _events(span)[telemetry.EVENT_DUPLICATE_DETECTED] == {P + "waiters": 1}
    assert span.attributes is not None
    assert span.attributes[P + "outcome"] == "result" and span.attributes[P + "wait_seconds"] > 0
    _assert_no_raw_token(spans)


async def test_aborted_duplicate_span_has_error_status(spans: InMemorySpanExporter) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    primary, dup = await _duplicate_of_gated_primary(agent, script, gate)
    primary.cancel()
    with pytest.raises(IdempotencyAbortedError):
        await asyncio.wait_for(dup, WAIT)
    gate.set()
    (span,) = _named(spans, telemetry.SPAN_DUPLICATE)
    assert span.attributes is not None and span.attributes[P + "outcome"] == "aborted"
    assert span.status.status_code is StatusCode.ERROR


def _durable(script: ScriptedBedrock, store: IdempotencyStore, **config: Any) -> Agent:
    return Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope="svc", **config),
    )


async def test_claim_then_replay_spans(spans: InMemorySpanExporter) -> None:
    store = InMemoryIdempotencyStore()
    agent = _durable(ScriptedBedrock(), store)
    await agent.invoke_async("weather?", idempotency_token=TOKEN)
    await agent.invoke_async("weather?", idempotency_token=TOKEN)
    claimed, replayed = _named(spans, telemetry.SPAN_CLAIM)
    assert claimed.attributes is not None and replayed.attributes is not None
    assert claimed.attributes[P + "decision"] == "claimed"
    assert replayed.attributes[P + "decision"] == "replayed"
    assert telemetry.EVENT_RESULT_REPLAYED in _events(replayed)
    assert replayed.attributes[P + "key"] == make_key("svc", TOKEN)
    _assert_no_raw_token(spans)


async def test_fingerprint_mismatch_event(spans: InMemorySpanExporter) -> None:
    agent = _durable(ScriptedBedrock(), InMemoryIdempotencyStore())
    await agent.invoke_async("weather in Paris?", idempotency_token=TOKEN)
    with pytest.raises(IdempotencyKeyMismatchError):
        await agent.invoke_async("weather in Rome?", idempotency_token=TOKEN)
    span = _named(spans, telemetry.SPAN_CLAIM)[-1]
    assert span.attributes is not None and span.attributes[P + "decision"] == "mismatch"
    assert telemetry.EVENT_FINGERPRINT_MISMATCH in _events(span)
    assert span.status.status_code is StatusCode.ERROR
    _assert_no_raw_token(spans)


async def test_wait_deadline_and_lease_takeover_events(spans: InMemorySpanExporter) -> None:
    store = InMemoryIdempotencyStore()
    agent = _durable(ScriptedBedrock(), store, wait_timeout_seconds=0.2)
    key = make_key("svc", TOKEN)
    now = time.time()
    # A live owner for as long as the test needs: a minute's lease (its last heartbeat is written explicitly below).
    other = IdempotencyRecord(key, RecordState.IN_PROGRESS, "other", new_version(), 60.0, now + 120)
    assert await store.claim(other, now) is None
    with pytest.raises(IdempotencyWaitTimeoutError):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token=TOKEN), WAIT)
    timed_out = _named(spans, telemetry.SPAN_CLAIM)[-1]
    assert {telemetry.EVENT_WAITING_FOR_OWNER, telemetry.EVENT_WAIT_DEADLINE_EXCEEDED} <= set(_events(timed_out))
    assert timed_out.attributes is not None and timed_out.attributes[P + "decision"] == "timeout"

    counting = CountingStore(store)
    patient = asyncio.create_task(
        _durable(ScriptedBedrock(), counting).invoke_async("weather?", idempotency_token=TOKEN)
    )
    await _until(lambda: counting.calls["claim"] >= 1, WAIT, "the patient caller to meet the live owner")
    # the owner's last heartbeat, a 0.3 s lease: it dies, and the patient caller sees that version for a whole lease
    assert await store.renew(key, "other", version=new_version(), lease_seconds=0.3, expires_at=time.time() + 60)
    await asyncio.wait_for(patient, WAIT)
    assert counting.calls["take_over"] == 1
    taken = _named(spans, telemetry.SPAN_CLAIM)[-1]
    assert {telemetry.EVENT_WAITING_FOR_OWNER, telemetry.EVENT_LEASE_TAKEN_OVER} <= set(_events(taken))
    assert taken.attributes is not None and taken.attributes[P + "decision"] == "claimed"
    _assert_no_raw_token(spans)
