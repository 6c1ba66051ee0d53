"""The checker: a pure function from a run's history and final state to its violations and its work.

In the manner of Jepsen's checkers, nothing here watches the run: the history (what clients were told, what the
model and the tool did, fsync'ed as it happened) and the state left behind are judged against what the library
promises. A turn is *acknowledged* when a client got an answer for it. Violations, by kind:

- ``acked_turn_missing`` / ``acked_turn_twice``: an acknowledged turn's prompt is not in its persisted conversation,
  or is there more than once;
- ``two_answers_for_one_key``: clients got different answers for one key, or the conversation holds another answer
  than the one a client got;
- ``wrong_answer``: a client got an answer that is not an answer to its turn;
- ``dangling_tool_use``: an assistant ``toolUse`` not followed by the user's ``toolResult`` for it;
- ``malformed_turn``: a persisted turn that is not its prompt, two tool cycles and its own answer (a partial turn
  left behind, or two runs interleaved);
- ``stale_conversation``: a turn's answer says the model was sent another previous turn than the one persisted just
  before it (the conversation was not read again under the session lock);
- ``tool_rerun_after_completion``: a tool call's side effect started again, for the same tool key, after a run of it
  had completed;
- ``tool_without_key``: a tool of a durable invocation ran without a tool-call idempotency key;
- ``left_locked``: a conversation's session lock record is still held (``IN_PROGRESS``) after every process is gone;
- ``stuck_conversation``: a conversation could not take its closing turn (sent after the faults stopped).

Work amplification: model calls and tool runs per acknowledged turn, divided by the same figure of a fault-free run of
the same workload (1.00 is the floor). A tool run started again after a run that never completed (its process was
killed or stopped inside it) is not a violation: whether its effect happened is unknown to the library; those re-runs
are counted apart (``uncertain_tool_reruns``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .history import FinalState, History
from .names import STEPS, parse_answer, turn_of_prompt
from .workload import CLOSING, DISCONNECT, Turn

ACKED_MISSING = "acked_turn_missing"
ACKED_TWICE = "acked_turn_twice"
TWO_ANSWERS = "two_answers_for_one_key"
WRONG_ANSWER = "wrong_answer"
DANGLING_TOOL_USE = "dangling_tool_use"
MALFORMED_TURN = "malformed_turn"
STALE_CONVERSATION = "stale_conversation"
TOOL_RERUN = "tool_rerun_after_completion"
TOOL_WITHOUT_KEY = "tool_without_key"
LEFT_LOCKED = "left_locked"
STUCK = "stuck_conversation"
KINDS = (
    ACKED_MISSING,
    ACKED_TWICE,
    TWO_ANSWERS,
    WRONG_ANSWER,
    DANGLING_TOOL_USE,
    MALFORMED_TURN,
    STALE_CONVERSATION,
    TOOL_RERUN,
    TOOL_WITHOUT_KEY,
    LEFT_LOCKED,
    STUCK,
)
# Messages of one uninterrupted turn: the prompt, (tool use, tool result) per tool step, the answer.
MESSAGES_PER_TURN = 2 * STEPS
IN_PROGRESS = "IN_PROGRESS"


@dataclass(frozen=True)
class Violation:
    """One broken promise: its kind, where, and what was seen."""

    kind: str
    conversation: str | None
    turn: str | None
    detail: str


@dataclass(frozen=True)
class Work:
    """What a run paid: model calls and tool runs (started), and the turns acknowledged for it."""

    model_calls: int
    tool_runs: int
    acked: int

    def per_turn(self) -> tuple[float, float]:
        """Model calls and tool runs per acknowledged turn."""
        if not self.acked:
            return (0.0, 0.0)
        return (self.model_calls / self.acked, self.tool_runs / self.acked)


@dataclass
class Report:
    """The checker's verdict on one run.

    Attributes:
        ops: Requests clients sent.
        turns: Turns of the workload.
        acked: Turns acknowledged.
        unanswered: Work turns no client got an answer for by its deadline.
        faults: Faults applied, by kind.
        violations: Every violation found.
        work: What the run paid.
        baseline: What the fault-free run of the same workload paid, when known.
        uncertain_tool_reruns: Tool runs started again after a run that never completed.
        reconciled: Tool calls that died mid-run, asked about (reconcile), and how many had completed.
        checked_final_state: Whether the final state was there to check.
        outcomes: The clients' attempts, by outcome.
    """

    ops: int
    turns: int
    acked: int
    unanswered: list[str]
    faults: Counter[str]
    violations: list[Violation]
    work: Work
    baseline: Work | None = None
    uncertain_tool_reruns: int = 0
    reconciled: tuple[int, int] = (0, 0)
    checked_final_state: bool = True
    outcomes: Counter[str] = field(default_factory=Counter)

    def by_kind(self) -> Counter[str]:
        """Violations counted by kind."""
        return Counter(v.kind for v in self.violations)

    def amplification(self) -> tuple[float, float] | None:
        """(model calls, tool runs) per acknowledged turn, over the fault-free run's; None without a baseline."""
        if self.baseline is None or not self.work.acked or not self.baseline.acked:
            return None
        model, tool = self.work.per_turn()
        base_model, base_tool = self.baseline.per_turn()
        return (model / base_model if base_model else 0.0, tool / base_tool if base_tool else 0.0)


# -- the persisted conversation ---------------------------------------------------------------------------------


@dataclass
class PersistedTurn:
    """The messages of one turn in a persisted conversation (from its prompt to the next prompt)."""

    turn: str | None
    messages: list[dict[str, Any]]

    def answer_text(self) -> str | None:
        """The text of the turn's last message when it is an assistant answer without a tool call."""
        if not self.messages:
            return None
        last = self.messages[-1]
        blocks = last.get("content", [])
        if last.get("role") != "assistant" or any("toolUse" in b for b in blocks):
            return None
        texts = [b["text"] for b in blocks if "text" in b]
        return "".join(texts).strip() if texts else None


def _prompt_of(message: dict[str, Any]) -> str | None:
    if message.get("role") != "user":
        return None
    for block in message.get("content", []):
        if "text" in block:
            turn = turn_of_prompt(block["text"])
            if turn is not None:
                return turn
    return None


def split_turns(messages: list[dict[str, Any]]) -> list[PersistedTurn]:
    """A conversation cut at its prompts (messages before the first prompt form a turn of their own, ``turn=None``)."""
    turns: list[PersistedTurn] = []
    for message in messages:
        turn = _prompt_of(message)
        if turn is not None or not turns:
            turns.append(PersistedTurn(turn, []))
        turns[-1].messages.append(message)
    return turns


def _dangling_tool_uses(conversation: str, messages: list[dict[str, Any]]) -> Iterable[Violation]:
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        uses = [b["toolUse"]["toolUseId"] for b in message.get("content", []) if "toolUse" in b]
        if not uses:
            continue
        following = messages[index + 1] if index + 1 < len(messages) else {}
        results = {
            b["toolResult"]["toolUseId"]
            for b in following.get("content", [])
            if following.get("role") == "user" and "toolResult" in b
        }
        for use in uses:
            if use not in results:
                prompt = next((t for t in (_prompt_of(m) for m in reversed(messages[:index])) if t), None)
                yield Violation(DANGLING_TOOL_USE, conversation, prompt, f"toolUse {use} at message {index}")


def _turn_shape(conversation: str, turns: list[PersistedTurn]) -> Iterable[Violation]:
    previous: str | None = None
    for persisted in turns:
        answer_text = persisted.answer_text()
        answer = parse_answer(answer_text) if answer_text is not None else None
        if persisted.turn is None:
            yield Violation(MALFORMED_TURN, conversation, None, f"{len(persisted.messages)} messages before any prompt")
        elif answer is None or answer.turn != persisted.turn:
            yield Violation(MALFORMED_TURN, conversation, persisted.turn, f"ends without its answer: {answer_text!r}")
        elif len(persisted.messages) != MESSAGES_PER_TURN:
            yield Violation(
                MALFORMED_TURN,
                conversation,
                persisted.turn,
                f"{len(persisted.messages)} messages, not {MESSAGES_PER_TURN}",
            )
        if answer is not None and persisted.turn is not None and answer.previous != previous:
            yield Violation(
                STALE_CONVERSATION,
                conversation,
                persisted.turn,
                f"answered after <{answer.previous}>, persisted after <{previous}>",
            )
        previous = persisted.turn


def _conversation_violations(final: FinalState) -> Iterable[Violation]:
    for conversation, messages in sorted(final.conversations.items()):
        yield from _dangling_tool_uses(conversation, messages)
        yield from _turn_shape(conversation, split_turns(messages))


# -- acknowledged turns -----------------------------------------------------------------------------------------


def _answers_by_key(attempts: list[dict[str, Any]]) -> dict[str, list[str]]:
    answers: dict[str, list[str]] = defaultdict(list)
    for attempt in attempts:
        if attempt.get("outcome") == "ok":
            answers[attempt["key"]].append(str(attempt.get("text") or "").strip())
    return answers


def _acked_violations(turn: Turn, answers: list[str], final: FinalState | None) -> Iterable[Violation]:
    for text in sorted(set(answers)):
        answer = parse_answer(text)
        if answer is None or answer.turn != turn.turn:
            yield Violation(WRONG_ANSWER, turn.conversation, turn.turn, f"answered {text!r}")
    persisted_answers: list[str] = []
    if final is not None:
        persisted = [t for t in split_turns(final.conversations.get(turn.conversation, [])) if t.turn == turn.turn]
        if not persisted:
            yield Violation(ACKED_MISSING, turn.conversation, turn.turn, f"answered {answers[0]!r}, not persisted")
        elif len(persisted) > 1:
            yield Violation(ACKED_TWICE, turn.conversation, turn.turn, f"persisted {len(persisted)} times")
        persisted_answers = [a for a in (t.answer_text() for t in persisted) if a is not None]
    distinct = sorted(set(answers) | set(persisted_answers))
    if len(distinct) > 1:
        told = sorted(set(answers))
        yield Violation(TWO_ANSWERS, turn.conversation, turn.turn, f"clients got {told}, persisted {persisted_answers}")


# -- tool runs --------------------------------------------------------------------------------------------------


def _tool_violations(calls: list[dict[str, Any]]) -> tuple[list[Violation], int]:
    """Tool re-runs after a completed run (violations), and the count of re-runs after uncertain ones."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    violations: list[Violation] = []
    for record in calls:
        if record.get("ev") != "tool":
            continue
        key = record.get("key")
        if key is None:
            if record.get("phase") == "start":
                violations.append(Violation(TOOL_WITHOUT_KEY, None, record.get("turn"), f"step {record.get('step')}"))
            continue
        runs[key].append(record)
    uncertain = 0
    for key, records in sorted(runs.items()):
        records.sort(key=lambda r: r["mono"])
        starts = [r for r in records if r["phase"] == "start"]
        done = next((r for r in records if r["phase"] == "done"), None)
        again = [r for r in starts if done is not None and r["mono"] > done["mono"]]
        if done is not None and again:
            later = again[0]["mono"] - done["mono"]
            detail = (
                f"tool key {key[:12]}… (step {done.get('step')}) completed by pid {done.get('pid')}, started again "
                f"{len(again)} time(s), first by pid {again[0].get('pid')} {later:.1f}s later"
            )
            violations.append(Violation(TOOL_RERUN, None, done.get("turn"), detail))
        elif len(starts) > 1:
            uncertain += len(starts) - 1
    return violations, uncertain


# -- the verdict ------------------------------------------------------------------------------------------------


def work_of(history: History) -> Work:
    """Model calls and tool runs started in the run, and the turns acknowledged."""
    acked = {a["key"] for a in history.attempts if a.get("outcome") == "ok"}
    model = sum(1 for c in history.calls if c.get("ev") == "model" and c.get("phase") == "start")
    tools = sum(1 for c in history.calls if c.get("ev") == "tool" and c.get("phase") == "start")
    return Work(model, tools, len(acked))


def _reconciled(calls: list[dict[str, Any]]) -> tuple[int, int]:
    asked = [c for c in calls if c.get("ev") == "reconcile"]
    return len(asked), sum(1 for c in asked if c.get("found"))


def _faults(history: History) -> Counter[str]:
    faults = Counter(f["kind"] for f in history.faults)
    faults.update(c["kind"] for c in history.calls if c.get("ev") == "fault")  # applied by the workers themselves
    hung_up = sum(1 for a in history.attempts if a.get("outcome") == "hung_up")
    if hung_up:
        faults[DISCONNECT] += hung_up
    return faults


def check(history: History, baseline: Work | None = None) -> Report:
    """Judge one run: its violations (see the module docstring), its faults and its work.

    Args:
        history: The run's records and final state.
        baseline: The work of a fault-free run of the same workload, for the amplification.
    """
    answers = _answers_by_key(history.attempts)
    violations: list[Violation] = []
    unanswered: list[str] = []
    for turn in history.workload.turns:
        told = answers.get(turn.key)
        if told:
            violations.extend(_acked_violations(turn, told, history.final))
        elif turn.phase == CLOSING:
            violations.append(Violation(STUCK, turn.conversation, turn.turn, "no answer to the closing turn"))
        else:
            unanswered.append(turn.turn)
    final = history.final
    if final is not None:
        violations.extend(_conversation_violations(final))
        for conversation, lock in sorted(final.locks.items()):
            if lock is not None and lock.get("state") == IN_PROGRESS:
                violations.append(Violation(LEFT_LOCKED, conversation, None, f"held by owner {lock.get('owner')}"))
    tool_violations, uncertain = _tool_violations(history.calls)
    violations.extend(tool_violations)
    return Report(
        ops=len(history.attempts),
        turns=len(history.workload.turns),
        acked=len(answers),
        unanswered=unanswered,
        faults=_faults(history),
        violations=violations,
        work=work_of(history),
        baseline=baseline,
        uncertain_tool_reruns=uncertain,
        reconciled=_reconciled(history.calls),
        checked_final_state=final is not None,
        outcomes=Counter(str(a.get("outcome")) for a in history.attempts),
    )
