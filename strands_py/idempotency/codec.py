"""How an ``AgentResult`` is encoded into a record's payload, and rebuilt from it for a replay. No I/O here.

What is stored: the stop reason, the final message, the token usage, the interrupts (each ``Interrupt``'s fields)
and the structured output (as JSON); not the other metrics, the agent's state or the conversation.

The first byte of a payload tells its format:

- ``2`` (format 2, written today), integers big-endian::

      b"2" | flags (1 byte) | document length (8) | blob count (4) | per blob: stored length (8), zlib (1)
           | document | blob 0 | blob 1 | ...

  ``flags`` bit 0: the document is zlib-compressed (only when that makes it smaller); no other bit is defined. The
  document is the UTF-8 JSON object of the result's fields. Every ``bytes`` value (an image, a document) is stored
  out of line as a blob, not base64-inflated, once per distinct content, and zlib-compressed only when a sample of
  it compresses (images do not, so they never pay for zlib). In the JSON, blob ``i`` is ``{"$b": i}``, and a dict
  whose only key starts with ``$`` is escaped as ``{"$e": [key, value]}``; nothing else changes. So any value built
  from dicts with str keys, lists, str, int, float, bool, None and bytes round-trips exactly, whatever its keys
  look like. Tuples come back as lists, subclasses (enums) as their base type, and dict keys that are not str are
  stored as JSON stores them (``1`` becomes ``"1"``).
- ``o``: the result was omitted, too large for the store: JSON ``{"size": n, "limit": m}``.
- ``z`` (format 1, still read, no longer written): zlib-compressed JSON with bytes as ``{"__bytes__": base64}``,
  which could not tell bytes from a dict of that shape.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.interrupt import Interrupt
from strands.telemetry.metrics import EventLoopMetrics

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyResultTooLargeError
from .record import IdempotencyRecord, ReplayedAgentResult

_TAG_V1 = b"z"
_TAG_V2 = b"2"
_TAG_OMITTED = b"o"

_HEADER = struct.Struct(">BQI")  # flags, document length, blob count
_BLOB_ENTRY = struct.Struct(">QB")  # stored length, 1 if zlib-compressed
_FLAG_DOCUMENT_ZLIB = 0x01

_REF_BLOB = "$b"
_REF_ESCAPED = "$e"

_MIN_COMPRESS_DOCUMENT_BYTES = 1024  # a shorter JSON document is stored as it is
_MIN_COMPRESS_BYTES = 128  # a blob shorter than this is stored raw: zlib's framing eats the gain
_SAMPLE_BYTES = 4096  # a blob longer than this is compressed only if its first 4 KiB compress
_SAMPLE_MIN_SAVING = 0.9  # "compresses": the sample shrinks to under 90%

# Fields of the installed strands' Interrupt: a record written beside another strands version may have more.
_INTERRUPT_FIELDS = frozenset(f.name for f in dataclasses.fields(Interrupt) if f.init)


class _Blobs:
    """The bytes of one result, each distinct content once, in the order they are met."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.references = 0
        self._index: dict[bytes, int] = {}

    def reference(self, value: bytes | bytearray) -> dict[str, int]:
        data = bytes(value)
        index = self._index.get(data)
        if index is None:
            index = self._index[data] = len(self.items)
            self.items.append(data)
        self.references += 1
        return {_REF_BLOB: index}


def _dumps(value: Any) -> tuple[str, _Blobs]:
    """``value`` as compact JSON text, with every bytes value replaced by a reference to a blob."""
    blobs = _Blobs()

    def default(item: Any) -> Any:
        if isinstance(item, bytes | bytearray):
            return blobs.reference(item)
        raise TypeError(f"{type(item).__name__} cannot be stored in an idempotency record")

    return json.dumps(value, default=default, separators=(",", ":"), ensure_ascii=False), blobs


def _escape(value: Any) -> Any:
    """``value`` with every dict whose only key starts with ``$`` escaped, so that it cannot read as a tag."""
    if isinstance(value, dict):
        escaped = {key: _escape(item) for key, item in value.items()}
        if len(escaped) == 1:
            ((key, item),) = escaped.items()
            if isinstance(key, str) and key.startswith("$"):
                return {_REF_ESCAPED: [key, item]}
        return escaped
    if isinstance(value, list | tuple):
        return [_escape(item) for item in value]
    return value


def _to_json(fields: dict[str, Any]) -> tuple[str, _Blobs]:
    text, blobs = _dumps(fields)
    # Every string that starts with "$" shows as '"$' in the text ('$' is never escaped), and so does every blob
    # reference. None but the references: no dict needs escaping, and this one C-speed pass was all it took.
    if text.count('"$') != blobs.references:
        text, blobs = _dumps(_escape(fields))
    return text, blobs


def _object_hook(blobs: list[bytes]) -> Callable[[dict[str, Any]], Any]:
    """Invert the references and escapes, innermost object first, as ``json.loads`` builds them."""

    def hook(obj: dict[str, Any]) -> Any:
        if len(obj) != 1:
            return obj
        ((key, inner),) = obj.items()
        if not key.startswith("$"):
            return obj
        if key == _REF_BLOB:
            if type(inner) is int and 0 <= inner < len(blobs):
                return blobs[inner]
            raise ValueError(f"bad blob reference {inner!r}")
        if key == _REF_ESCAPED:
            if isinstance(inner, list) and len(inner) == 2 and isinstance(inner[0], str) and inner[0].startswith("$"):
                return {inner[0]: inner[1]}
            raise ValueError("bad escaped object")
        raise ValueError(f"unknown tag {key!r}")

    return hook


def _compresses(sample: memoryview | bytes) -> bool:
    return len(zlib.compress(sample, 1)) < len(sample) * _SAMPLE_MIN_SAVING


def _pack_blob(data: bytes) -> tuple[bytes, bool]:
    """The blob as stored, and whether it is zlib-compressed. Incompressible data is never run through zlib whole."""
    if len(data) < _MIN_COMPRESS_BYTES:
        return data, False
    if len(data) > _SAMPLE_BYTES and not _compresses(memoryview(data)[:_SAMPLE_BYTES]):
        return data, False
    squeezed = zlib.compress(data, 6)
    return (squeezed, True) if len(squeezed) < len(data) else (data, False)


def _inflate(data: memoryview | bytes) -> bytes:
    """zlib-decompress exactly one whole stream (``zlib.decompress`` ignores trailing bytes; we do not)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data)
    if not inflater.eof or inflater.unused_data:
        raise ValueError("truncated or overlong zlib stream")
    return out


def _interrupt_fields(interrupt: Interrupt) -> dict[str, Any]:
    return {field.name: getattr(interrupt, field.name) for field in dataclasses.fields(interrupt)}


def encode_result(result: AgentResult, max_bytes: int | None) -> bytes:
    """Encode a result for the store (format 2); if it is over ``max_bytes``, a marker that it was omitted.

    Args:
        result: The primary's result.
        max_bytes: The store's limit on a payload, or None.

    Raises:
        TypeError: The result holds a value that cannot be stored (neither JSON nor bytes, a circular value, an
            integer too long to print, nesting too deep): such a result is not stored.
    """
    structured = result.structured_output
    interrupts = result.interrupts
    fields = {
        "stop_reason": result.stop_reason,
        "message": result.message,
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": structured.model_dump(mode="json") if structured is not None else None,
        "interrupts": None if interrupts is None else [_interrupt_fields(i) for i in interrupts],
    }
    payload = encode_value(fields)
    if max_bytes is not None and len(payload) > max_bytes:
        return _TAG_OMITTED + json.dumps({"size": len(payload), "limit": max_bytes}).encode("utf-8")
    return payload


def encode_value(value: Any) -> bytes:
    """Encode a value built from dicts with str keys, lists, str, int, float, bool, None and bytes (format 2).

    A result's payload is one such document; the journal's entries are others.

    Raises:
        TypeError: The value holds something that cannot be stored (neither JSON nor bytes, a circular value, an
            integer too long to print, nesting too deep).
    """
    try:
        text, blobs = _to_json(value)
    except RecursionError as e:
        raise TypeError("the value is nested too deeply to be stored in an idempotency record") from e
    except ValueError as e:
        raise TypeError(f"the value cannot be stored in an idempotency record: {e}") from e
    # surrogatepass: a lone surrogate in a model's text round-trips like any other character.
    document = text.encode("utf-8", "surrogatepass")
    flags = 0
    # JSON text is worth a try, except a short one: inflating it on every replay would cost more than it saves.
    if len(document) >= _MIN_COMPRESS_DOCUMENT_BYTES:
        compressed = zlib.compress(document, 6)
        if len(compressed) < len(document):
            document, flags = compressed, _FLAG_DOCUMENT_ZLIB
    packed = [_pack_blob(blob) for blob in blobs.items]
    return b"".join(
        [
            _TAG_V2,
            _HEADER.pack(flags, len(document), len(packed)),
            *(_BLOB_ENTRY.pack(len(data), squeezed) for data, squeezed in packed),
            document,
            *(data for data, _ in packed),
        ]
    )


def decode_value(data: bytes) -> Any:
    """Rebuild a value written by ``encode_value``.

    Raises:
        ValueError: The data is not a whole format-2 document.
    """
    view = memoryview(data)
    if view[:1] != _TAG_V2:
        raise ValueError(f"unknown format {bytes(view[:1])!r}")
    return _decode_document(view[1:])


def _decode_v2(body: memoryview) -> dict[str, Any]:
    fields = _decode_document(body)
    if not isinstance(fields, dict):
        raise ValueError("the document is not an object")
    return fields


def _decode_document(body: memoryview) -> Any:
    if len(body) < _HEADER.size:
        raise ValueError("truncated header")
    flags, document_length, count = _HEADER.unpack_from(body)
    if flags & ~_FLAG_DOCUMENT_ZLIB:
        raise ValueError(f"unknown flags {flags:#04x}")
    offset = _HEADER.size + count * _BLOB_ENTRY.size
    if offset + document_length > len(body):
        raise ValueError("truncated blob table or document")
    entries = list(_BLOB_ENTRY.iter_unpack(body[_HEADER.size : offset]))
    document = body[offset : offset + document_length]
    offset += document_length
    blobs = []
    for stored_length, squeezed in entries:
        if squeezed > 1:
            raise ValueError(f"unknown blob encoding {squeezed}")
        chunk = body[offset : offset + stored_length]
        if len(chunk) != stored_length:
            raise ValueError("truncated blob")
        offset += stored_length
        blobs.append(_inflate(chunk) if squeezed else bytes(chunk))
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} unexpected bytes after the last blob")
    text = (_inflate(document) if flags & _FLAG_DOCUMENT_ZLIB else bytes(document)).decode("utf-8", "surrogatepass")
    # No '"$' in the text: no reference and no escape to invert (the common case), so no hook per object.
    return json.loads(text, object_hook=_object_hook(blobs)) if '"$' in text else json.loads(text)


def _v1_object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    return obj


def _decode_v1(body: memoryview) -> dict[str, Any]:
    document = json.loads(zlib.decompress(body), object_hook=_v1_object_hook)
    if not isinstance(document, dict) or document.get("v") != 1:
        raise ValueError(f"unsupported format version {document.get('v') if isinstance(document, dict) else None!r}")
    return {**document, "interrupts": None}


def _rebuild_interrupts(stored: Any) -> list[Interrupt] | None:
    if stored is None:
        return None
    if not isinstance(stored, list):
        raise ValueError("interrupts are not a list")
    interrupts = []
    for item in stored:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("name"), str):
            raise ValueError("interrupt without a str id and name")
        interrupts.append(Interrupt(**{k: v for k, v in item.items() if k in _INTERRUPT_FIELDS}))
    return interrupts


def decode_result(record: IdempotencyRecord, structured_output_model: type[BaseModel] | None) -> ReplayedAgentResult:
    """Rebuild the stored result of a ``COMPLETED`` record (format 2, or format 1 written by earlier versions).

    Args:
        record: The completed record.
        structured_output_model: The model to rebuild ``structured_output`` with; None leaves it None.

    Raises:
        IdempotencyRecordCorruptedError: The payload is missing or cannot be decoded (unknown format or flags,
            truncated or overlong, bad references, fields of the wrong type, structured output that does not
            validate against ``structured_output_model``). The cause is chained.
        IdempotencyResultTooLargeError: The result was too large to store.
    """
    payload = record.payload
    if not payload:
        raise IdempotencyRecordCorruptedError(record.key, "completed record has no payload")
    tag, body = payload[:1], memoryview(payload)[1:]
    try:
        if tag == _TAG_OMITTED:
            omitted = json.loads(bytes(body))
            raise IdempotencyResultTooLargeError(record.key, int(omitted["size"]), int(omitted["limit"]))
        if tag == _TAG_V2:
            fields = _decode_v2(body)
        elif tag == _TAG_V1:
            fields = _decode_v1(body)
        else:
            raise ValueError(f"unknown payload format {tag!r}")
        stop_reason, message, usage = fields["stop_reason"], fields["message"], fields["usage"]
        if not isinstance(stop_reason, str) or not isinstance(message, dict) or not isinstance(usage, dict):
            raise ValueError("stop_reason, message or usage has the wrong type")
        metrics = EventLoopMetrics()
        metrics.accumulated_usage.update(usage)  # type: ignore[typeddict-item]
        structured = fields["structured_output"]
        return ReplayedAgentResult(
            stop_reason=stop_reason,  # type: ignore[arg-type]
            message=message,  # type: ignore[arg-type]
            metrics=metrics,
            state={},
            interrupts=_rebuild_interrupts(fields["interrupts"]),
            structured_output=(
                structured_output_model.model_validate(structured)
                if structured is not None and structured_output_model is not None
                else None
            ),
            idempotency_key=record.key,
        )
    except IdempotencyResultTooLargeError:
        raise
    except Exception as e:
        raise IdempotencyRecordCorruptedError(record.key, f"{type(e).__name__}: {e}") from e
