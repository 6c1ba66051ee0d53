r"""The wire format: strands events become a small, documented JSON event vocabulary, framed as Server-Sent Events.

| event       | data                                                                              |
|-------------|-----------------------------------------------------------------------------------|
| `data`      | `{"text": str}`: a chunk of the answer's text                                      |
| `reasoning` | `{"text": str}`: a chunk of the model's reasoning text                             |
| `tool_use`  | `{"tool_use_id": str, "name": str}`: the model started calling a tool              |
| `message`   | `{"message": Message}`: a complete message (the model's, or the tool results)      |
| `result`    | `{"stop_reason", "message", "text", "usage", "structured_output", "interrupts"}`   |
| `error`     | an RFC 9457 problem details object (with `retry_after` when retrying helps)        |
| `rewind`    | `{"to": int}`: the events after position `to` are withdrawn (see below)            |

The ``result`` event's data is the invocation's JSON body: ``interrupts`` is ``[]``, or, for a run that stopped
with ``stop_reason`` ``"interrupt"`` (a tool or hook asked a human), ``[{"id": str, "name": str, "reason": JSON}]``:
answer them with ``{"interrupt_responses": [{"interrupt_id", "response"}]}`` as a new turn of the conversation.

Every event carries ``id: <run>:<position>``: ``position`` counts the events of one run from 1, ``run`` names the
run (``r`` for a replay of a stored result, which is always the two events ``message`` and ``result``). A journaled
run's name is ``<lineage>.<server>``: the lineage is shared by every server that runs the invocation (the first
owner's, kept in its journal), so a client re-attached to another server after a takeover resumes the same
sequence: the new owner replays the journaled steps as the same events with the same positions. Where the dead
owner had streamed part of a step it never journaled, the new owner's events from there on differ: the client first
gets ``rewind`` with ``id: <run>:<to>``, drops what it showed after position ``to``, and the stream goes on from there.
``bytes`` in messages (images, documents) travel as base64 strings, as in the Bedrock Converse JSON API.

Text that is not valid Unicode, such as a file name or a subprocess's output a tool decoded with
``errors="surrogateescape"`` (``"report-\udcff.txt"``), travels as JSON's ``\udcff`` escape: valid JSON text
in valid UTF-8, which ``json.loads`` and ``JSON.parse`` turn back into the very same string. Everything else that is
not ASCII travels as UTF-8.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel
from strands.agent.agent_result import AgentResult

REPLAY_TAG = "r"

# A lone surrogate: a str may hold one, UTF-8 cannot encode it.
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_DEPTH = 200


class WireEvent(NamedTuple):
    """One event as sent: its position in the run's sequence, its name, and its Server-Sent Events frame.

    Attributes:
        position: 1-based position in the run's event sequence.
        name: The event name (``data``, ``message``, ``result``, ...).
        frame: The encoded ``id:``/``event:``/``data:`` frame, shared by every client that reads it.
    """

    position: int
    name: str
    frame: bytes


def _json_default(value: Any) -> Any:
    """JSON for what strands puts in messages: bytes as base64, pydantic models as JSON, anything else as text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return list(value)
    return str(value)


# One encoder for every ``dumps``: its settings never change, and ``encode`` keeps no state between calls (each
# call builds its own), so it is safe from any thread; ``json.dumps`` with these arguments would build one per call.
_ENCODER = json.JSONEncoder(default=_json_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> str:
    r"""Compact JSON on one line (so that it is one SSE ``data:`` line) that always encodes as UTF-8.

    Non-ASCII is kept as is, except lone surrogates, which become ``\uXXXX`` escapes (see the module's
    documentation). Never raises: what JSON cannot hold (keys that are not strings, NaN and infinities, integers
    too long to print, a circular reference, nesting deeper than JSON decoders allow) is served as text rather
    than fail a response after the agent ran.
    """
    chunk = value.get("text") if type(value) is dict and len(value) == 1 else None
    if type(chunk) is str:
        # Most events of a streamed answer are a chunk of text, {"text": str}: a string's encoding is one C call, the
        # same JSON ``encode`` of the whole dict writes (a string key, then the string), without its other work.
        text = '{"text":' + _ENCODER.encode(chunk) + "}"
    else:
        try:
            text = _ENCODER.encode(value)
        except Exception:  # TypeError, ValueError, RecursionError, or whatever a model_dump or __str__ raised
            text = _ENCODER.encode(_plain(value, 0, set()))
    # Surrogates can only be inside JSON strings (everything else json.dumps writes is ASCII), where the escape of
    # a character means that character: the text stays the same JSON value.
    return text if text.isascii() else _SURROGATE.sub(_escape_surrogate, text)


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _plain(value: Any, depth: int, seen: set[int]) -> Any:
    """``value`` as plain JSON values: str keys, no cycles, bounded depth (the rest as text). For ``dumps`` only."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int):
        try:
            int.__repr__(value)  # longer than sys.get_int_max_str_digits() cannot be printed
        except ValueError:
            return f"<int of {value.bit_length()} bits>"
        return value
    if depth >= _MAX_DEPTH or id(value) in seen:
        return "..." if depth >= _MAX_DEPTH else "<circular>"
    if isinstance(value, dict):
        seen.add(id(value))
        try:
            return {str(key): _plain(item, depth + 1, seen) for key, item in value.items()}
        finally:
            seen.discard(id(value))
    if isinstance(value, list | tuple):
        seen.add(id(value))
        try:
            return [_plain(item, depth + 1, seen) for item in value]
        finally:
            seen.discard(id(value))
    try:
        converted = _json_default(value)
    except Exception:  # a model_dump or __str__ that fails: a placeholder, never a failed response
        return f"<{type(value).__name__}>"
    return converted if isinstance(converted, str) else _plain(converted, depth + 1, seen)


def frame(tag: str, position: int, name: str, data: str) -> WireEvent:
    """Frame one event; ``data`` is JSON text without line breaks."""
    return WireEvent(position, name, f"id: {tag}:{position}\nevent: {name}\ndata: {data}\n\n".encode())


def interrupt_items(interrupts: Any) -> list[dict[str, Any]]:
    """Interrupts as the wire shows them: ``{"id", "name", "reason"}`` each (never a response)."""
    return [
        {"id": interrupt.id, "name": interrupt.name, "reason": getattr(interrupt, "reason", None)}
        for interrupt in interrupts or ()
    ]


def result_body(result: AgentResult) -> dict[str, Any]:
    """The ``result`` event's data, which is also the JSON response body of an invocation.

    ``interrupts`` is always there (``[]`` when the run did not stop for a human). The ``text`` of a run that
    stopped for interrupts is the text of its message (strands' ``str()`` of such a result lists the interrupts as
    Python text, which they already are in ``interrupts``).
    """
    structured = result.structured_output
    interrupts = interrupt_items(getattr(result, "interrupts", None))
    return {
        "stop_reason": result.stop_reason,
        "message": result.message,
        "text": _message_text(result.message) if interrupts else str(result),
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": structured.model_dump(mode="json") if structured is not None else None,
        "interrupts": interrupts,
    }


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    texts = [block["text"] for block in content or () if isinstance(block, dict) and isinstance(block.get("text"), str)]
    return "\n".join(texts)


class EventTranslator:
    """Turns one run's strands events into wire events ``(name, data)``; everything else strands emits is dropped.

    Not thread-safe: one translator per run, fed by the run's task.
    """

    def __init__(self) -> None:
        """A translator for a new run."""
        self._tools_seen: set[str] = set()

    def translate(self, event: Any) -> Sequence[tuple[str, dict[str, Any]]]:
        """The wire events of one strands event (most have none: an empty sequence)."""
        # About half of a streamed answer's events are the model's raw chunks ({"event": ...}), which have none.
        if not isinstance(event, dict) or ("event" in event and len(event) == 1):
            return ()
        get = event.get
        result = get("result")
        if isinstance(result, AgentResult):
            return [("result", result_body(result))]
        wire: list[tuple[str, dict[str, Any]]] = []
        text = get("data")
        if isinstance(text, str) and text:
            wire.append(("data", {"text": text}))
        reasoning = get("reasoningText")
        if isinstance(reasoning, str) and reasoning:
            wire.append(("reasoning", {"text": reasoning}))
        tool = get("current_tool_use")
        if isinstance(tool, dict):
            tool_use_id = tool.get("toolUseId")
            if isinstance(tool_use_id, str) and tool_use_id not in self._tools_seen:
                self._tools_seen.add(tool_use_id)
                wire.append(("tool_use", {"tool_use_id": tool_use_id, "name": tool.get("name")}))
        message = get("message")
        if isinstance(message, dict):
            wire.append(("message", {"message": message}))
        return wire
