"""How an ``AgentResult`` is encoded into a record's payload, and rebuilt from it for a replay. No I/O here."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyResultTooLargeError
from .record import IdempotencyRecord, ReplayedAgentResult

_FORMAT_VERSION = 1
_TAG_ZLIB_JSON = b"z"
_TAG_OMITTED = b"o"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} cannot be stored in an idempotency record")


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    return obj


def encode_result(result: AgentResult, max_bytes: int | None) -> bytes:
    """Encode a result as compressed JSON; if it is still over ``max_bytes``, a marker that it was omitted."""
    structured = result.structured_output
    document = {
        "v": _FORMAT_VERSION,
        "stop_reason": result.stop_reason,
        "message": result.message,
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": structured.model_dump(mode="json") if structured is not None else None,
    }
    raw = json.dumps(document, separators=(",", ":"), default=_json_default).encode("utf-8")
    packed = _TAG_ZLIB_JSON + zlib.compress(raw, 6)
    if max_bytes is not None and len(packed) > max_bytes:
        return _TAG_OMITTED + json.dumps({"size": len(packed), "limit": max_bytes}).encode("utf-8")
    return packed


def decode_result(record: IdempotencyRecord, structured_output_model: type[BaseModel] | None) -> ReplayedAgentResult:
    """Rebuild the stored result of a ``COMPLETED`` record.

    Raises:
        IdempotencyRecordCorruptedError: The payload is missing or cannot be decoded.
        IdempotencyResultTooLargeError: The result was too large to store.
    """
    payload = record.payload
    if not payload:
        raise IdempotencyRecordCorruptedError(record.key, "completed record has no payload")
    tag, body = payload[:1], payload[1:]
    try:
        if tag == _TAG_OMITTED:
            omitted = json.loads(body)
            raise IdempotencyResultTooLargeError(record.key, int(omitted["size"]), int(omitted["limit"]))
        if tag != _TAG_ZLIB_JSON:
            raise ValueError(f"unknown payload format {tag!r}")
        document = json.loads(zlib.decompress(body), object_hook=_json_object_hook)
        if document.get("v") != _FORMAT_VERSION:
            raise ValueError(f"unsupported format version {document.get('v')!r}")
        metrics = EventLoopMetrics()
        metrics.accumulated_usage.update(document["usage"])
        structured = document["structured_output"]
        if structured is not None and structured_output_model is not None:
            structured = structured_output_model.model_validate(structured)
        return ReplayedAgentResult(
            stop_reason=document["stop_reason"],
            message=document["message"],
            metrics=metrics,
            state={},
            structured_output=structured if isinstance(structured, BaseModel) else None,
            idempotency_key=record.key,
        )
    except IdempotencyResultTooLargeError:
        raise
    except Exception as e:
        raise IdempotencyRecordCorruptedError(record.key, f"{type(e).__name__}: {e}") from e
