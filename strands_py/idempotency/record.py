"""The stored record, and how keys, fingerprints and results are encoded into it. No I/O here."""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics

from ..types.exceptions import (
    IdempotencyRecordCorruptedError,
    IdempotencyResultTooLargeError,
    IdempotencyTokenError,
)

_FORMAT_VERSION = 1
_TAG_ZLIB_JSON = b"z"
_TAG_OMITTED = b"o"


class RecordState(str, enum.Enum):
    """Where an invocation is: claimed and running somewhere, or completed with a replayable result."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True)
class IdempotencyRecord:
    """One token's record. Times are seconds since the epoch (``time.time()``), comparable across hosts.

    Attributes:
        key: ``scope#sha256(token)``; the raw token is never stored.
        state: ``IN_PROGRESS`` or ``COMPLETED``.
        owner: Random id of the invocation that claimed the record; completes and releases are fenced on it.
        lease_expires_at: Until when an ``IN_PROGRESS`` claim is honoured; after it, another caller may take over.
        expires_at: When the record stops counting at all (also the DynamoDB TTL attribute).
        fingerprint: SHA-256 of the request, or None when payload validation is off.
        payload: The encoded result of a ``COMPLETED`` record.
    """

    key: str
    state: RecordState
    owner: str
    lease_expires_at: float
    expires_at: float
    fingerprint: str | None = None
    payload: bytes | None = None

    def is_live(self, now: float) -> bool:
        """Whether the record still decides what a call with its token does (not expired, lease not lapsed)."""
        if self.expires_at <= now:
            return False
        return self.state is RecordState.COMPLETED or self.lease_expires_at > now


def make_key(scope: str, token: Any) -> str:
    """``scope#sha256(token)``.

    Tokens are hashed from a canonical form: a ``str`` from its UTF-8, ``bytes`` as they are, anything else from
    canonical JSON. So ``1``, ``1.0`` and ``True`` are three different durable keys (in-process they match by
    ``==``).

    Raises:
        IdempotencyTokenError: The token is not ``str``, ``bytes`` or JSON-serializable.
    """
    if isinstance(token, str):
        canonical = b"s:" + token.encode("utf-8")
    elif isinstance(token, bytes):
        canonical = b"b:" + token
    else:
        try:
            canonical = b"j:" + json.dumps(token, sort_keys=True, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise IdempotencyTokenError(
                f"durable idempotency needs a str, bytes or JSON-serializable token, got {type(token).__name__}"
            ) from e
    return f"{scope}#{hashlib.sha256(canonical).hexdigest()}"


def _fingerprint_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"model": value.__qualname__, "schema": value.model_json_schema()}
    raise TypeError(f"{type(value).__name__} is not part of a request fingerprint")


def request_fingerprint(prompt: Any, options: dict[str, Any]) -> str:
    """SHA-256 of the request: the prompt and the options that change the answer.

    Args:
        prompt: The call's prompt (str, content blocks, messages, or None); bytes (images, documents) count by hash.
        options: ``structured_output_model`` (by name and JSON schema) and ``structured_output_prompt``.

    Raises:
        TypeError: The prompt holds something that cannot be fingerprinted (set ``validate_payload=False``).
    """
    request = {"prompt": prompt, **options}
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_fingerprint_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class ReplayedAgentResult(AgentResult):
    """An ``AgentResult`` replayed from the idempotency store instead of produced by running the agent.

    ``message``, ``stop_reason``, token usage (``metrics.accumulated_usage``) and ``structured_output`` are the
    original invocation's; other metrics are empty. ``isinstance(result, ReplayedAgentResult)`` tells a replay.

    Attributes:
        idempotency_key: The record's key.
    """

    idempotency_key: str = ""


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
