"""What a durable primary hands to its tools: idempotency keys for tool calls, and its lease.

Tools with side effects (payments, bookings, emails) need a key of their own that stays the same when an invocation
is run again after a takeover, in another process. Every tool call of a durable invocation gets one, derived from
the durable key, the tool's name, its input and the occurrence of that (name, input) pair in the invocation, so the
same call in a re-run gets the same key and a different call a different one.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .keys import tool_call_key

if TYPE_CHECKING:
    from ._heartbeat import _Lease

# Where the run context travels: strands passes invocation_state to hooks and to every tool's ToolContext.
STATE_KEY = "strands_py.idempotency"


class _RunContext:
    """One durable primary's run: its key, its lease, and the keys given to its tool calls so far.

    Thread-safety: tool keys are assigned under a lock (tools may run on executor threads).
    """

    def __init__(self, *, key: str | None, hmac_key: bytes | None, leases: list[_Lease], journal: Any = None) -> None:
        """Create the context of the primary holding ``key`` (None: a session turn without a token) and ``leases``.

        ``journal``: the run's step journal (``strands_py.turn._journal.Journal``, typed loosely here because that
        layer sits above this one), or None when the run is not journaled.
        """
        self.key = key
        self.hmac_key = hmac_key
        self.leases = leases
        self.journal = journal
        self._mutex = threading.Lock()
        self._occurrences: Counter[tuple[str, str]] = Counter()
        self._by_tool_use_id: dict[str, str] = {}
        self._closers: list[Callable[[], None]] = []

    def on_close(self, closer: Callable[[], None]) -> None:
        """Have ``closer`` called once the run's stream is closed (what its start set up for the run only)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Call the closers, the last registered first, each once; by whoever closed the run's stream."""
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            closer()

    def lease_lost(self) -> bool:
        """Whether this primary lost (or let lapse) one of its leases: it must not start anything more."""
        return any(lease.lost is not None or lease.expired_locally() for lease in self.leases)

    def key_for(self, tool_use: Any) -> str | None:
        """The idempotency key of one tool call (``{"toolUseId", "name", "input"}``); the same on every ask."""
        if self.key is None:
            return None
        tool_use_id = str(tool_use.get("toolUseId", ""))
        name = str(tool_use.get("name", ""))
        tool_input = tool_use.get("input")
        with self._mutex:
            known = self._by_tool_use_id.get(tool_use_id)
            if known is not None:
                return known
            # Occurrences count in the order tools start (strands starts a batch's tools in the model's order), so
            # the second identical call of a run is the second identical call of its re-run too.
            pair = (name, json.dumps(tool_input, sort_keys=True, separators=(",", ":"), default=repr))
            self._occurrences[pair] += 1
            try:
                assigned = tool_call_key(self.key, name, tool_input, self._occurrences[pair], self.hmac_key)
            except TypeError:
                # Model-produced input is JSON; anything else gets no key rather than failing the tool.
                return None
            self._by_tool_use_id[tool_use_id] = assigned
            return assigned


def run_context_of(invocation_state: Any) -> _RunContext | None:
    """The run context in an ``invocation_state`` (also nested, as strands does with deprecated kwargs)."""
    if not isinstance(invocation_state, dict):
        return None
    found = invocation_state.get(STATE_KEY)
    if found is None and isinstance(invocation_state.get("invocation_state"), dict):
        found = invocation_state["invocation_state"].get(STATE_KEY)
    return found if isinstance(found, _RunContext) else None


def tool_idempotency_key(tool_context: Any) -> str | None:
    """The idempotency key of the running tool call, for a tool to forward to the service it calls.

    Use it from a tool declared with ``@tool(context=True)``::

        @tool(context=True)
        def pay(amount_cents: int, tool_context: ToolContext) -> str:
            key = tool_idempotency_key(tool_context)
            response = httpx.post(PAYMENTS_URL, json={"amount": amount_cents}, headers={"Idempotency-Key": key})
            ...

    The key is a 64-character hex string derived from the invocation's durable key (keyed with ``hmac_key`` when
    set), the tool's name, its input and how many identical calls came before it in the invocation. The same call
    in a re-run of the invocation (after a takeover, in another process) gets the same key.

    Args:
        tool_context: The ``strands.ToolContext`` of the running tool.

    Returns:
        The key, or None when the invocation is not durable (no ``idempotency=`` or no token).

    Thread-safety: safe from any thread (tools may run on executor threads).
    """
    context = run_context_of(getattr(tool_context, "invocation_state", None))
    if context is None:
        return None
    return context.key_for(getattr(tool_context, "tool_use", {}))
