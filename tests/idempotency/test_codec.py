"""The result codec: exact round-trips (Hypothesis), blobs out of line, zlib only when it pays, format 1, corruption."""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import zlib
from typing import Any
from unittest import mock

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.interrupt import Interrupt
from strands.telemetry.metrics import EventLoopMetrics

from strands_py.idempotency import codec
from strands_py.idempotency.codec import decode_result, encode_result
from strands_py.idempotency.record import IdempotencyRecord, RecordState, ReplayedAgentResult
from strands_py.types.exceptions import IdempotencyRecordCorruptedError, IdempotencyResultTooLargeError

KEY = "tenant-a/agent#0123abcd"
HEADER = struct.Struct(">BQI")  # flags, document length, blob count
ENTRY = struct.Struct(">QB")  # stored length, zlib


class Forecast(BaseModel):
    city: str
    degrees: int


class Loose(BaseModel):
    data: dict[str, Any]


def _result(
    content: list[Any],
    *,
    interrupts: list[Interrupt] | None = None,
    structured: BaseModel | None = None,
    stop_reason: Any = "end_turn",
) -> AgentResult:
    metrics = EventLoopMetrics()
    metrics.accumulated_usage.update({"inputTokens": 3, "outputTokens": 4, "totalTokens": 7})
    message: Any = {"role": "assistant", "content": content}
    return AgentResult(stop_reason, message, metrics, {}, interrupts=interrupts, structured_output=structured)


def _record(payload: bytes | None) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=KEY,
        state=RecordState.COMPLETED,
        owner="owner",
        version="v",
        lease_seconds=0.0,
        expires_at=1.0,
        payload=payload,
    )


def _replay(result: AgentResult, model: type[BaseModel] | None = None) -> ReplayedAgentResult:
    return decode_result(_record(encode_result(result, None)), model)


def _parse(payload: bytes) -> tuple[int, list[tuple[int, int]], Any, bytes]:
    """Test-side reader of format 2: (flags, blob table, document, blob region)."""
    assert payload[:1] == b"2"
    flags, length, count = HEADER.unpack_from(payload, 1)
    offset = 1 + HEADER.size + count * ENTRY.size
    entries = list(ENTRY.iter_unpack(payload[1 + HEADER.size : offset]))
    raw = payload[offset : offset + length]
    document = json.loads(zlib.decompress(raw) if flags & 1 else raw)
    return flags, entries, document, payload[offset + length :]


def _v2(
    document: Any, blobs: bytes = b"", entries: Any = (), flags: int = 0, raw: bytes | None = None, count: int = -1
) -> bytes:
    """A format-2 payload from a hand-written document and blob table."""
    if raw is None:
        raw = json.dumps(document).encode()
    table = b"".join(ENTRY.pack(*entry) for entry in entries)
    return b"2" + HEADER.pack(flags, len(raw), len(entries) if count < 0 else count) + table + raw + blobs


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``==`` alone says ``1 == 1.0 == True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b) and a == b
    return bool(a == b)


# ---------------------------------------------------------------------------------------------------------------
# Exact round-trips, with the previous (ambiguous) encoder as the negative control


_ANY_CHAR = st.characters() | st.characters(categories=["Cs"])  # lone surrogates too
_KEYS = st.sampled_from(["$b", "$e", "$", "$$b", "$x", "__bytes__", "b", ""]) | st.text(_ANY_CHAR, max_size=6)
_LOOKALIKES = (
    st.builds(lambda b: {"__bytes__": base64.b64encode(b).decode()}, st.binary(max_size=8))
    | st.builds(lambda s: {"__bytes__": s}, st.text(max_size=4))
    | st.builds(lambda i: {"$b": i}, st.integers(-1, 3))
    | st.builds(lambda v: {"$e": v}, st.integers() | st.dictionaries(_KEYS, st.none(), max_size=2))
    | st.builds(lambda k, v: {"$e": [k, v]}, _KEYS, st.integers() | st.binary(max_size=2))
    | st.sampled_from(["$", "$5.00", "$b", '"$'])
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_ANY_CHAR)
    | st.binary(max_size=300)
    | st.builds(lambda unit, n: unit * n, st.binary(min_size=1, max_size=3), st.integers(0, 3000))  # compressible
    | _LOOKALIKES
)
JSON_WITH_BYTES = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=25,
)


def _v1_encode_result(result: AgentResult, max_bytes: int | None) -> bytes:
    """Broken: the previous encoder, whose ``{"__bytes__": ...}`` marker is ambiguous."""

    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode("ascii")}
        raise TypeError(type(value).__name__)

    document = {
        "v": 1,
        "stop_reason": result.stop_reason,
        "message": result.message,
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": None,
    }
    return b"z" + zlib.compress(json.dumps(document, separators=(",", ":"), default=default).encode(), 6)


def _round_trip_is_exact(encode: Any, value: Any) -> None:
    content = [{"toolUse": {"toolUseId": "t1", "name": "tool", "input": value}}, {"json": value}, {"text": "done"}]
    result = _result(content)
    replay = decode_result(_record(encode(result, None)), None)
    assert _same(replay.message, result.message)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(value=JSON_WITH_BYTES)
def test_any_json_with_bytes_value_round_trips_exactly(value: Any) -> None:
    _round_trip_is_exact(encode_result, value)


@pytest.mark.xfail(strict=True, reason="format 1 reads a {'__bytes__': ...} dict back as bytes")
@settings(max_examples=400, derandomize=True, deadline=None)
@given(value=JSON_WITH_BYTES)
def test_any_json_with_bytes_value_round_trips_exactly_negative_control(value: Any) -> None:
    _round_trip_is_exact(_v1_encode_result, value)


@pytest.mark.xfail(strict=True, reason="without escapes, a dict shaped like a reference reads as one")
# Found, not shrunk: the control only has to fail (shrinking its counterexample took a minute on a loaded machine).
@settings(max_examples=400, derandomize=True, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(value=JSON_WITH_BYTES)
def test_any_json_with_bytes_value_round_trips_exactly_negative_control_no_escapes(value: Any) -> None:
    with mock.patch.object(codec, "_escape", lambda v: v):
        _round_trip_is_exact(encode_result, value)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(reason=JSON_WITH_BYTES, response=JSON_WITH_BYTES)
def test_interrupt_reasons_and_responses_round_trip_exactly(reason: Any, response: Any) -> None:
    interrupt = Interrupt(id="v1:tool:t1:approve", name="approve", reason=reason, response=response)
    (replayed,) = _replay(_result([], interrupts=[interrupt], stop_reason="interrupt")).interrupts or []
    assert isinstance(replayed, Interrupt)
    assert (replayed.id, replayed.name) == (interrupt.id, interrupt.name)
    assert _same(replayed.reason, reason) and _same(replayed.response, response)


@pytest.mark.parametrize(
    "value",
    [
        {"__bytes__": "AP8="},
        {"$b": 0},
        {"$e": {"$b": 0}},
        {"$": None},
        {"$b": b"\x00", "other": 1},
        [b"\x00", {"$b": 0}, {"$e": 1}],
        {"$e": {"$e": {"$b": b"\x01"}}},
        {"$e": ["$b", 0]},
        {"price": "$5.00", "raw": b"\x00"},
    ],
)
def test_reference_lookalikes_stay_what_they_are(value: Any) -> None:
    _round_trip_is_exact(encode_result, value)


@pytest.mark.parametrize(
    "encode",
    [encode_result, pytest.param(_v1_encode_result, marks=pytest.mark.xfail(strict=True, reason="replays as bytes"))],
)
def test_a_bytes_marker_in_model_output_replays_as_a_dict(encode: Any) -> None:
    _round_trip_is_exact(encode, {"__bytes__": "AP8="})


def test_text_a_tool_decoded_with_surrogateescape_round_trips_exactly() -> None:
    name = b"report-\xff\xfe.txt".decode("utf-8", "surrogateescape")  # a file name that is not UTF-8
    content = [{"toolResult": {"toolUseId": "t", "content": [{"text": name}], "status": "success"}}, {"text": name}]
    replay = _replay(_result([*content, {"json": {name: [name, "\ud83d\ude00"]}}]))
    assert replay.message["content"][:2] == content
    assert replay.message["content"][2] == {"json": {name: [name, "\ud83d\ude00"]}}  # a split pair stays split
    assert str(replay).count(name) == 1


def test_tuples_come_back_as_lists_bytearrays_as_bytes_and_keys_as_json_keys() -> None:
    replay = _replay(_result([{"json": {"t": (1, "a"), "b": bytearray(b"\x00\x01"), "k": {1: "one", None: 0}}}]))
    expected = {"json": {"t": [1, "a"], "b": b"\x00\x01", "k": {"1": "one", "null": 0}}}
    assert _same(replay.message["content"][0], expected)
    escaped = _replay(_result([{"json": {"t": ({"$b": (1,)},), "k": {"$": {2: b"x"}}}}]))  # the escaping path too
    assert _same(escaped.message["content"][0], {"json": {"t": [{"$b": [1]}], "k": {"$": {"2": b"x"}}}})


def test_stop_reason_usage_and_state_of_a_replay() -> None:
    replay = _replay(_result([{"text": "hi"}], stop_reason="max_tokens"))
    assert isinstance(replay, ReplayedAgentResult) and replay.idempotency_key == KEY
    assert replay.stop_reason == "max_tokens" and replay.state == {}
    assert replay.metrics.accumulated_usage["totalTokens"] == 7
    assert replay.interrupts is None and replay.structured_output is None


# ---------------------------------------------------------------------------------------------------------------
# Interrupts and structured output


def test_interrupts_are_rebuilt_as_interrupt_objects() -> None:
    interrupts = [
        Interrupt(id="v1:tool:t1:approve", name="approve", reason={"amount": 120, "receipt": b"%PDF"}),
        Interrupt(id="v1:tool:t2:confirm", name="confirm", reason="sure?", response={"ok": True}),
    ]
    result = _result([{"toolUse": {"toolUseId": "t1", "name": "pay", "input": {}}}], interrupts=interrupts)
    replay = _replay(result)
    assert replay.interrupts == interrupts
    assert all(type(i) is Interrupt for i in replay.interrupts or [])
    assert str(replay) == str(result)  # AgentResult.__str__ lists the interrupts first
    assert _replay(_result([], interrupts=[])).interrupts == []


def test_interrupt_fields_of_another_strands_version_are_ignored() -> None:
    document = {
        "stop_reason": "interrupt",
        "message": {"role": "assistant", "content": []},
        "usage": {},
        "structured_output": None,
        "interrupts": [{"id": "i", "name": "n", "reason": None, "response": None, "added_later": 1}],
    }
    assert decode_result(_record(_v2(document)), None).interrupts == [Interrupt(id="i", name="n")]


def test_structured_output_is_rebuilt_with_the_model_passed() -> None:
    result = _result([{"text": "ok"}], structured=Forecast(city="Paris", degrees=21))
    assert _replay(result, Forecast).structured_output == Forecast(city="Paris", degrees=21)
    assert _replay(result, None).structured_output is None
    tricky = Loose(data={"$b": 0, "x": {"$e": 1}, "__bytes__": "AP8="})
    assert _replay(_result([], structured=tricky), Loose).structured_output == tricky


def test_structured_output_that_does_not_fit_the_model_is_corrupt() -> None:
    payload = encode_result(_result([], structured=Loose(data={"a": 1})), None)
    with pytest.raises(IdempotencyRecordCorruptedError, match="ValidationError"):
        decode_result(_record(payload), Forecast)


# ---------------------------------------------------------------------------------------------------------------
# Size: blobs out of line, zlib only where it pays


def test_an_image_is_stored_raw_out_of_line_and_never_compressed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(200_000)  # random: does not compress, like real image data
    compressed_sizes: list[int] = []
    real_compress = zlib.compress

    def spy(data: Any, level: int = -1) -> bytes:
        compressed_sizes.append(len(data))
        return real_compress(data, level)

    monkeypatch.setattr(codec.zlib, "compress", spy)
    content = [{"text": "a cat"}, {"image": {"format": "png", "source": {"bytes": image}}}]
    payload = encode_result(_result(content), None)
    _, entries, _, blobs = _parse(payload)
    assert entries == [(len(image), 0)] and blobs == image
    assert len(payload) < len(image) + 400  # no base64 (+33%), no zlib framing
    assert max(compressed_sizes) <= 4096  # only a sample of the image, and the small document, went through zlib
    assert _replay(_result(content)).message["content"][1]["image"]["source"]["bytes"] == image


def test_compressible_blobs_and_documents_are_compressed() -> None:
    text = "the weather in Paris is sunny. " * 2000
    document_bytes = b'{"k": "value"}\n' * 5000
    payload = encode_result(_result([{"text": text}, {"document": {"source": {"bytes": document_bytes}}}]), None)
    flags, entries, _, _ = _parse(payload)
    assert flags == 1 and entries[0][1] == 1
    assert len(payload) < (len(text) + len(document_bytes)) // 20


def test_the_document_stays_raw_when_zlib_does_not_make_it_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    real_compress = zlib.compress
    monkeypatch.setattr(codec.zlib, "compress", lambda data, level=-1: real_compress(data, level) + b"\x00" * 10**6)
    payload = encode_result(_result([{"text": "x" * 1000}, {"b": b"y" * 1000}]), None)
    flags, entries, document, _ = _parse(payload)
    assert flags == 0 and entries == [(1000, 0)] and document["message"]["content"][1] == {"b": {"$b": 0}}
    monkeypatch.undo()
    assert _same(decode_result(_record(payload), None).message["content"][1], {"b": b"y" * 1000})


def test_tiny_blobs_and_short_incompressible_blobs_are_stored_raw() -> None:
    short_random = os.urandom(2000)  # under the sample size: tried whole, kept raw since zlib does not help
    payload = encode_result(_result([{"b": b"\x01\x02"}, {"b": short_random}]), None)
    _, entries, _, blobs = _parse(payload)
    assert entries == [(2, 0), (2000, 0)] and blobs == b"\x01\x02" + short_random


def test_equal_bytes_are_stored_once() -> None:
    image = os.urandom(10_000)
    payload = encode_result(_result([{"b": image}, {"again": image}, {"copy": bytes(bytearray(image))}]), None)
    _, entries, _, _ = _parse(payload)
    assert len(entries) == 1 and len(payload) < 11_000


def test_a_result_over_the_limit_is_replaced_by_a_marker() -> None:
    result = _result([{"b": os.urandom(5000)}])
    size = len(encode_result(result, None))
    assert encode_result(result, size) == encode_result(result, None)  # exactly at the limit: stored
    omitted = encode_result(result, size - 1)
    assert omitted[:1] == b"o"
    with pytest.raises(IdempotencyResultTooLargeError, match=f"{size} bytes") as raised:
        decode_result(_record(omitted), None)
    assert raised.value.key == KEY


# ---------------------------------------------------------------------------------------------------------------
# Format 1 (written by earlier releases) stays readable

# Written by the previous release's encode_result (stop reason, a text and an image block, usage, Forecast output).
V1_PAYLOAD = base64.b64decode(
    "enicTU/LagMxDPyXOfuSJtCw0EP+IIfeQjHOrroxzVqLJYeExf9eOQ+ILhppNBppwQXdykGUZ58pCCd0oDR4LTnBYSKRMBK6BZnPlhFEomhI"
    "amzPSclQd1igdDWAU0R1C+L0VP1ynkIj5jSaQrjk/k4cb0rSgPd36L0N7fbbL1SLn+pQXs4xzUW/+Y+SCdYOXPStsXFQ1nB+1Z+1/ZNLby/Q"
    "4B/DbU0f9WYe+5Cj2CkDjZnaCR+rWv8B63la9w=="
)


def test_format_1_records_still_decode() -> None:
    replay = decode_result(_record(V1_PAYLOAD), Forecast)
    assert replay.stop_reason == "end_turn"
    assert replay.message == {
        "role": "assistant",
        "content": [{"text": "hi"}, {"image": {"format": "png", "source": {"bytes": b"\x00\xff"}}}],
    }
    assert replay.metrics.accumulated_usage["totalTokens"] == 7
    assert replay.structured_output == Forecast(city="Paris", degrees=21)
    assert replay.interrupts is None


# ---------------------------------------------------------------------------------------------------------------
# Anything undecodable is IdempotencyRecordCorruptedError naming the key

_GOOD = {
    "stop_reason": "end_turn",
    "message": {"role": "assistant", "content": []},
    "usage": {},
    "structured_output": None,
    "interrupts": None,
}


def _doc(*content: Any, **overrides: Any) -> dict[str, Any]:
    return {**_GOOD, "message": {"role": "assistant", "content": list(content)}, **overrides}


def _valid() -> bytes:
    return encode_result(_result([{"text": "hello " * 100}, {"b": b"z" * 1000}, {"b": os.urandom(100)}]), None)


_DOC = json.dumps(_doc()).encode()
_ONE_BLOB = {"entries": [(1, 0)], "blobs": b"x"}
_CORRUPT = {
    "none": None,
    "empty": b"",
    "unknown-tag": b"?unknown",
    "v1-not-zlib": b"z" + b"not zlib",
    "v1-other-version": b"z" + zlib.compress(b'{"v":7}'),
    "v1-not-an-object": b"z" + zlib.compress(b"[1]"),
    "v1-bad-base64": b"z" + zlib.compress(json.dumps({"v": 1, "message": {"__bytes__": "A"}}).encode()),
    "omitted-not-json": b"o{",
    "v2-no-header": b"2",
    "v2-short-header": b"2\x00\x00",
    "v2-unknown-flag": _v2(_doc(), flags=2),
    "v2-document-truncated": _v2(_doc())[:-1],
    "v2-document-length-too-long": b"2" + HEADER.pack(0, 10**6, 0) + b"{}",
    "v2-blob-count-too-large": _v2(_doc(), count=2**32 - 1),
    "v2-blob-table-truncated": _v2(_doc(), count=1),
    "v2-document-not-json": _v2(None, raw=b"{not json"),
    "v2-document-not-utf8": _v2(None, raw=b'{"stop_reason":"\xff"}'),
    "v2-document-a-list": _v2([1]),
    "v2-document-too-deep": _v2(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "v2-zlib-flag-on-raw-document": _v2(_doc(), flags=1),
    "v2-zlib-document-truncated": _v2(None, flags=1, raw=zlib.compress(_DOC)[:-3]),
    "v2-zlib-document-trailing": _v2(None, flags=1, raw=zlib.compress(_DOC) + b"x"),
    "v2-blob-encoding-2": _v2(_doc(), b"x", [(1, 2)]),
    "v2-blob-truncated": _v2(_doc(), b"x", [(2, 0)]),
    "v2-bytes-after-last-blob": _v2(_doc(), b"xy", [(1, 0)]),
    "v2-blob-not-zlib": _v2(_doc(), b"abc", [(3, 1)]),
    "v2-blob-zlib-trailing": _v2(_doc(), zlib.compress(b"abc") + b"!", [(len(zlib.compress(b"abc")) + 1, 1)]),
    "v2-valid-truncated": _valid()[:-1],
    "v2-valid-extended": _valid() + b"\x00",
    "v2-ref-out-of-range": _v2(_doc({"b": {"$b": 1}}), **_ONE_BLOB),
    "v2-ref-negative": _v2(_doc({"b": {"$b": -1}}), **_ONE_BLOB),
    "v2-ref-bool": _v2(_doc({"b": {"$b": True}}), **_ONE_BLOB),
    "v2-ref-str": _v2(_doc({"b": {"$b": "0"}}), **_ONE_BLOB),
    "v2-escape-not-a-list": _v2(_doc({"$e": {"$b": 1}})),
    "v2-escape-one-item": _v2(_doc({"$e": ["$b"]})),
    "v2-escape-key-not-str": _v2(_doc({"$e": [1, 1]})),
    "v2-escape-needless": _v2(_doc({"$e": ["a", 1]})),
    "v2-unknown-tag": _v2(_doc({"$z": 1})),
    "v2-stop-reason-not-str": _v2(_doc(stop_reason=1)),
    "v2-message-not-dict": _v2({**_GOOD, "message": []}),
    "v2-usage-not-dict": _v2(_doc(usage=[])),
    "v2-missing-field": _v2({"stop_reason": "end_turn"}),
    "v2-interrupts-not-list": _v2(_doc(interrupts={})),
    "v2-interrupt-not-dict": _v2(_doc(interrupts=[1])),
    "v2-interrupt-without-id": _v2(_doc(interrupts=[{"name": "n"}])),
    "v2-interrupt-name-not-str": _v2(_doc(interrupts=[{"id": "i", "name": 1}])),
}


def test_the_valid_base_of_the_corrupt_variants_decodes() -> None:
    assert decode_result(_record(_valid()), None).message["content"][1] == {"b": b"z" * 1000}
    replay = decode_result(_record(_v2(_doc({"b": {"$b": 0}}, {"e": {"$e": ["$b", 0]}}), **_ONE_BLOB)), None)
    assert replay.message["content"] == [{"b": b"x"}, {"e": {"$b": 0}}]
    squeezed = zlib.compress(b"abc")
    assert decode_result(_record(_v2(_doc({"b": {"$b": 0}}), squeezed, [(len(squeezed), 1)])), None).message[
        "content"
    ] == [{"b": b"abc"}]


@pytest.mark.parametrize("payload", list(_CORRUPT.values()), ids=list(_CORRUPT))
def test_undecodable_payloads_are_corrupt_and_name_the_key(payload: bytes | None) -> None:
    with pytest.raises(IdempotencyRecordCorruptedError) as raised:
        decode_result(_record(payload), Forecast)
    assert raised.value.key == KEY and KEY in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# What cannot be stored exactly is not stored


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _circular() -> Any:
    value: list[Any] = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([{"x": object()}], "object cannot be stored"),
        ([{"x": {(1, 2): "a"}}], "keys must be str"),
        ([{"x": 10**5000}], "cannot be stored"),
        ([{"x": _deep(100_000)}], "nested too deeply"),
        ([{"$x": _deep(100_000)}], "nested too deeply"),
        ([{"x": _circular()}], "Circular reference"),
    ],
    ids=["object", "tuple-key", "huge-int", "deep", "deep-dollar-key", "circular"],
)
def test_values_that_cannot_be_stored_exactly_are_a_type_error(content: list[Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        encode_result(_result(content), None)


def test_an_interrupt_reason_that_is_not_json_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="set cannot be stored"):
        encode_result(_result([], interrupts=[Interrupt(id="i", name="n", reason={1, 2})]), None)
