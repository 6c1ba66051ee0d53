"""OpenTelemetry signals of the idempotency gate.

Raw tokens never appear: durable keys are hashed, and in-process duplicates carry no token attribute at all.

Spans (children of whatever span is current when the call starts; none is ever made current, so they are safe
across the yields of async generators):

- ``strands_py.idempotency.duplicate``: an in-process duplicate waiting for its primary. Event
  ``duplicate_detected`` (``waiters``); attributes ``wait_seconds`` and ``outcome`` (``result``, ``error``,
  ``aborted``, ``cancelled``).
- ``strands_py.idempotency.claim``: the durable pass before the agent runs. Attributes ``key`` (scope and SHA-256
  of the token), ``decision`` (``claimed``, ``replayed``, ``mismatch``, ``timeout``, ``error``, ``waiting``),
  ``wait_seconds``.
  Events ``waiting_for_owner``, ``lease_taken_over``, ``result_replayed``, ``fingerprint_mismatch``,
  ``wait_deadline_exceeded``.
- ``strands_py.idempotency.resume``: a run that took a claim over and resumes from its journal. Attributes ``key``,
  ``journal_entries``, and when the run ends ``replayed_model_steps``, ``replayed_tool_steps`` and
  ``diverged_at_step`` (-1: no divergence). Event ``journal_diverged`` (``step``): a journaled model step was
  recorded for another request, so the replay stopped there and the run went live.

All names below are prefixed with ``strands_py.idempotency.``.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from .__about__ import __version__

PREFIX = "strands_py.idempotency."
SPAN_DUPLICATE = PREFIX + "duplicate"
SPAN_CLAIM = PREFIX + "claim"
EVENT_DUPLICATE_DETECTED = PREFIX + "duplicate_detected"
EVENT_WAITING_FOR_OWNER = PREFIX + "waiting_for_owner"
EVENT_LEASE_TAKEN_OVER = PREFIX + "lease_taken_over"
EVENT_RESULT_REPLAYED = PREFIX + "result_replayed"
EVENT_FINGERPRINT_MISMATCH = PREFIX + "fingerprint_mismatch"
EVENT_WAIT_DEADLINE_EXCEEDED = PREFIX + "wait_deadline_exceeded"
SPAN_RESUME = PREFIX + "resume"
EVENT_JOURNAL_DIVERGED = PREFIX + "journal_diverged"

# Follows the global tracer provider (a no-op until the application configures one, as strands' own spans).
_tracer: trace.Tracer = trace.get_tracer("strands_py", __version__)


def _prefixed(attributes: dict[str, Any] | None) -> dict[str, Any]:
    return {PREFIX + k: v for k, v in (attributes or {}).items()}


def start_span(name: str, attributes: dict[str, Any] | None = None) -> Span:
    """Start a span under the current context without making it current. End it with ``end_span``."""
    return _tracer.start_span(name, attributes=_prefixed(attributes))


def add_event(span: Span, name: str, attributes: dict[str, Any] | None = None) -> None:
    """Add an event with prefixed attribute names (nothing is built for a span that records nothing)."""
    if span.is_recording():
        span.add_event(name, attributes=_prefixed(attributes))


def end_span(span: Span, attributes: dict[str, Any], error: BaseException | None = None) -> None:
    """Set the final attributes (and an error status) and end the span."""
    if not span.is_recording():
        span.end()
        return
    span.set_attributes(_prefixed(attributes))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()
