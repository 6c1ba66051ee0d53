"""What a journaled run does with a tool call that died mid-run (its effect is unknown)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

Reconcile = Callable[[str | None, Any], Any | Awaitable[Any]]
"""``reconcile(tool_key, tool_input)``: asks the downstream system whether the call's effect happened.

Given the call's tool idempotency key (``tool_idempotency_key``; None when the run has no token) and its input, it
returns the call's result if the effect happened (a str, a ``ToolResult``-like dict with ``content``, or any JSON
value), or None if it did not (the call then runs). Sync functions run on a worker thread; async ones on the loop.
"""

UncertainTool = Literal["retry", "report"] | Reconcile
"""A tool's policy for a call that died mid-run: ``"retry"`` runs it again (with the same tool idempotency key, so a
downstream API that honours keys deduplicates it), ``"report"`` gives the model a tool result saying the outcome is
unknown (the model decides what to do), or a ``Reconcile`` function asks the downstream system."""

UNCERTAIN_TOOL_POLICIES = ("retry", "report")
