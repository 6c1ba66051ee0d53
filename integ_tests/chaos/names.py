"""What the workers, the clients and the checker agree on: prompts, scripted answers, tool inputs, the scope.

A turn's prompt names the turn; every model step and tool call of a turn names it too, and the final answer names the
turn, the turn the model saw just before it, and which process and model call produced it. So the persisted
conversation and the answers clients got say which run of which turn wrote them, and whether the model was sent the
conversation as it stood.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Every agent of the run keys its records (and its session locks) in one durable scope, over HTTP and in direct calls
# alike, so that a retry of a key meets the same record, and a turn the same session lock, whichever way it arrives.
# ``AgentApp`` scopes a request as ``<its config's scope>/<the scope function's tenant>``: its config has
# ``APP_SCOPE``, its scope function names ``TENANT`` for every request, and direct calls are configured with ``SCOPE``.
APP_SCOPE = "chaos"
TENANT = "clients"
SCOPE = f"{APP_SCOPE}/{TENANT}"
AGENT_ID = "default"
TABLE = "chaos-idempotency"
TOOL = "act"
# Model steps of one turn: text and a tool call, a second tool call, the answer.
STEPS = 3
TOOL_STEPS = (1, 2)
CONVERSATION_HEADER = "X-Chaos-Conversation"
NOBODY = "nothing"

_PROMPT = re.compile(r"^turn (?P<turn>\S+)$")
_ANSWER = re.compile(r"^answer to <(?P<turn>[^>]*)> after <(?P<previous>[^>]*)> by (?P<pid>\d+)/(?P<call>\d+)$")


def prompt_for(turn: str) -> str:
    """The prompt of turn ``turn``."""
    return f"turn {turn}"


def turn_of_prompt(text: str) -> str | None:
    """The turn a prompt names, or None when the text is not a prompt of this run."""
    match = _PROMPT.match(text.strip())
    return match["turn"] if match else None


def answer_for(turn: str, previous: str | None, pid: int, call: int) -> str:
    """The scripted answer of ``turn`` by model call ``call`` of process ``pid``, after ``previous`` (or none)."""
    return f"answer to <{turn}> after <{previous or NOBODY}> by {pid}/{call}"


@dataclass(frozen=True)
class Answer:
    """A parsed answer: which turn it answers, the turn the model saw before it, who produced it."""

    turn: str
    previous: str | None
    pid: int
    call: int


def parse_answer(text: str) -> Answer | None:
    """``text`` as an ``Answer``, or None when it is not one."""
    match = _ANSWER.match(text.strip())
    if match is None:
        return None
    previous = match["previous"]
    return Answer(match["turn"], None if previous == NOBODY else previous, int(match["pid"]), int(match["call"]))


def thinking_for(turn: str) -> str:
    """The text the first model step says before its tool call."""
    return f"working on <{turn}>"


def tool_result_for(turn: str, step: int) -> str:
    """What the tool returns for ``step`` of ``turn``."""
    return f"done {turn}/{step}"
