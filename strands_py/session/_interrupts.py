"""Interrupts a conversation waits for, and the check that binds an answer to them.

strands stops a run with ``stop_reason="interrupt"`` when a tool (``tool_context.interrupt``) or a hook
(``event.interrupt``) asks a human; the agent keeps the state in ``agent._interrupt_state`` (``activated``, and the
interrupts raised, each with its ``response`` once answered), and a session manager persists it in the agent's record
(``_internal_state["interrupt_state"]``). The next call resumes with a prompt of ``interruptResponse`` blocks.

Upstream checks an answer against the agent object it was given, which for an agent built per request or kept
between requests may be stale. Here the check runs on the state just read from the conversation, under the session
lock (``SessionTurn.begin``), before anything of the call runs: an answer must name interrupts pending *now*, and a
new prompt must wait until none is pending. A mismatch raises ``InterruptStateError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strands.interrupt import Interrupt

from ..types.exceptions import InterruptResponseStaleError, InterruptsPendingError


def pending_interrupts(agent: Any) -> list[Interrupt]:
    """The interrupts ``agent`` waits for: raised in its current interrupt cycle and not answered."""
    state = getattr(agent, "_interrupt_state", None)
    if state is None or not getattr(state, "activated", False):
        return []
    return [interrupt for interrupt in state.interrupts.values() if interrupt.response is None]


def pending_in_record(internal_state: Any) -> list[Interrupt]:
    """The pending interrupts a persisted agent record's ``_internal_state`` holds (strands' own serialisation).

    A record written by another strands version may carry fields this one's ``Interrupt`` lacks: they are dropped.
    Anything malformed reads as nothing pending (the check under the lock decides anyway).
    """
    state = internal_state.get("interrupt_state") if isinstance(internal_state, Mapping) else None
    if not isinstance(state, Mapping) or state.get("activated") is not True:
        return []
    interrupts = state.get("interrupts")
    if not isinstance(interrupts, Mapping):
        return []
    pending = []
    for item in interrupts.values():
        if not isinstance(item, Mapping) or item.get("response") is not None:
            continue
        interrupt_id, name = item.get("id"), item.get("name")
        if isinstance(interrupt_id, str) and isinstance(name, str):
            pending.append(Interrupt(id=interrupt_id, name=name, reason=item.get("reason")))
    return pending


def answered_ids(prompt: Any) -> list[str] | None:
    """The interrupt ids a prompt answers, when it is a non-empty list of ``interruptResponse`` blocks; else None."""
    if not isinstance(prompt, list) or not prompt:
        return None
    ids = []
    for block in prompt:
        answer = block.get("interruptResponse") if isinstance(block, Mapping) and len(block) == 1 else None
        if not isinstance(answer, Mapping):
            return None
        interrupt_id = answer.get("interruptId")
        ids.append(interrupt_id if isinstance(interrupt_id, str) else repr(interrupt_id))
    return ids


def _mentions_answers(prompt: Any) -> bool:
    """Whether a prompt that is not a clean list of answers still carries some (a malformed mix)."""
    return isinstance(prompt, list) and any(
        isinstance(block, Mapping) and "interruptResponse" in block for block in prompt
    )


def check_interrupts(agent: Any, prompt: Any) -> None:
    """Refuse a call that does not fit the interrupts ``agent`` waits for (its state as just read).

    A mix of answers and other content is left to strands, which refuses it (``TypeError`` or ``ValueError``).

    Raises:
        InterruptResponseStaleError: The prompt answers an interrupt that is not pending.
        InterruptsPendingError: The prompt is not an answer, and interrupts are pending.
    """
    pending = pending_interrupts(agent)
    answered = answered_ids(prompt)
    if answered is None:
        if pending and not _mentions_answers(prompt):
            raise InterruptsPendingError(pending)
        return
    waiting = {interrupt.id for interrupt in pending}
    stale = [interrupt_id for interrupt_id in answered if interrupt_id not in waiting]
    if stale:
        raise InterruptResponseStaleError(stale, pending)
