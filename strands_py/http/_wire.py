"""The wire format: strands events become a small, documented JSON event vocabulary, framed as Server-Sent Events.

| event       | data                                                                              |
|-------------|-----------------------------------------------------------------------------------|
| `data`      | `{"text": str}`: a chunk of the answer's text                                      |
| `reasoning` | `{"text": str}`: a chunk of the model's reasoning text                             |
| `tool_use`  | `{"tool_use_id": str, "name": str}`: the model started calling a tool              |
| `message`   | `{"message": Message}`: a complete message (the model's, or the tool results)      |
| `result`    | `{"stop_reason", "message", "text", "usage", "structured_output"}`: the outcome    |
| `error`     | an RFC 9457 problem details object (with `retry_after` when retrying helps)        |

Every event carries ``id: <run>:<position>``: ``position`` counts the events of one run from 1, ``run`` names the
run (``r`` for a replay of a stored result, which is always the two events ``message`` and ``result``).
``bytes`` in messages (images, documents) travel as base64 strings, as in the Bedrock Converse JSON API.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from strands.agent.agent_result import AgentResult

from .._events import result_of

REPLAY_TAG = "r"


@dataclass(frozen=True)
class WireEvent:
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


def dumps(value: Any) -> str:
    """Compact JSON on one line (so that it is one SSE ``data:`` line), non-ASCII kept as is."""
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def frame(tag: str, position: int, name: str, data: str) -> WireEvent:
    """Frame one event; ``data`` is JSON text without line breaks."""
    return WireEvent(position, name, f"id: {tag}:{position}\nevent: {name}\ndata: {data}\n\n".encode())


def result_body(result: AgentResult) -> dict[str, Any]:
    """The ``result`` event's data, which is also the JSON response body of an invocation."""
    structured = result.structured_output
    return {
        "stop_reason": result.stop_reason,
        "message": result.message,
        "text": str(result),
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": structured.model_dump(mode="json") if structured is not None else None,
    }


class EventTranslator:
    """Turns one run's strands events into wire events ``(name, data)``; everything else strands emits is dropped.

    Not thread-safe: one translator per run, fed by the run's task.
    """

    def __init__(self) -> None:
        """A translator for a new run."""
        self._tools_seen: set[str] = set()

    def translate(self, event: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield the wire events of one strands event."""
        if not isinstance(event, dict):
            return
        result = result_of(event)
        if result is not None:
            yield "result", result_body(result)
            return
        text = event.get("data")
        if isinstance(text, str) and text:
            yield "data", {"text": text}
        reasoning = event.get("reasoningText")
        if isinstance(reasoning, str) and reasoning:
            yield "reasoning", {"text": reasoning}
        tool = event.get("current_tool_use")
        if isinstance(tool, dict):
            tool_use_id = tool.get("toolUseId")
            if isinstance(tool_use_id, str) and tool_use_id not in self._tools_seen:
                self._tools_seen.add(tool_use_id)
                yield "tool_use", {"tool_use_id": tool_use_id, "name": tool.get("name")}
        message = event.get("message")
        if isinstance(message, dict):
            yield "message", {"message": message}
