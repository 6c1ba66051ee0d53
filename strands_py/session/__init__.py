"""Conversations across hosts: a session lock per turn, enqueue or reject, and rollback of a crashed turn.

With ``Agent(session_manager=..., idempotency=IdempotencyConfig(...))`` (or a call that names ``session_id=``), every
turn holds a leased, heartbeated lock keyed by scope and session in the idempotency store, from before the
conversation is read until after the turn is written. See ``SessionInvocationMode`` and ``SessionTurn``.
"""

from ..types.exceptions import SessionBusyError
from ..types.session import SessionInvocationMode

__all__ = ["SessionBusyError", "SessionInvocationMode"]
