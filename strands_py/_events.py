"""What strands-py reads from the events of ``strands.Agent.stream_async``."""

from __future__ import annotations

from typing import Any

from strands.agent.agent_result import AgentResult


def result_of(event: Any) -> AgentResult | None:
    """The ``AgentResult`` of a ``{"result": ...}`` event, or None for any other event."""
    candidate = event.get("result") if isinstance(event, dict) else None
    return candidate if isinstance(candidate, AgentResult) else None
