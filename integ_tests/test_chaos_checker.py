"""The chaos run's checker on small hand-written histories: a clean history passes, and each kind of violation is
found (each test breaks one thing of the clean history). Pure and fast: no process, no server, no clock."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from chaos import checker
from chaos.checker import Work, check
from chaos.history import CLIENTS, EVENTS, FAULTS, FINAL, SETTINGS, WORKLOAD, FinalState, History, load_history
from chaos.names import TOOL, answer_for, prompt_for, thinking_for, tool_result_for
from chaos.workload import CLOSING, DISCONNECT, KILL_TOOL, Settings, Turn, Workload, make_workload

CONVERSATION = "conv-a"
TURNS = ("t1", "t2")


def _turn(turn: str, *, key: str | None = None, phase: str = "work") -> Turn:
    return Turn(
        turn=turn,
        conversation=CONVERSATION,
        key=key or f"key-{turn}",
        client=0,
        path="http",
        mode="enqueue",
        phase=phase,
    )


def _messages(turn: str, previous: str | None, pid: int = 100) -> list[dict[str, Any]]:
    """One uninterrupted turn as strands persists it: prompt, two tool cycles, answer."""

    def use(step: int) -> dict[str, Any]:
        return {"toolUse": {"toolUseId": f"{turn}-{step}", "name": TOOL, "input": {"turn": turn, "step": step}}}

    def result(step: int) -> dict[str, Any]:
        content = [{"text": tool_result_for(turn, step)}]
        return {"toolResult": {"toolUseId": f"{turn}-{step}", "status": "success", "content": content}}

    return [
        {"role": "user", "content": [{"text": prompt_for(turn)}]},
        {"role": "assistant", "content": [{"text": thinking_for(turn)}, use(1)]},
        {"role": "user", "content": [result(1)]},
        {"role": "assistant", "content": [use(2)]},
        {"role": "user", "content": [result(2)]},
        {"role": "assistant", "content": [{"text": answer_for(turn, previous, pid, 3)}]},
    ]


def _attempt(turn: str, text: str | None, outcome: str = "ok", start: float = 1.0) -> dict[str, Any]:
    return {
        "ev": "attempt",
        "turn": turn,
        "conversation": CONVERSATION,
        "key": f"key-{turn}",
        "outcome": outcome,
        "text": text,
        "start": start,
        "end": start + 1,
        "pid": 100,
        "slot": 0,
        "client": 0,
    }


def _calls(turn: str, at: float) -> list[dict[str, Any]]:
    """The model calls and tool runs of one uninterrupted turn."""
    calls: list[dict[str, Any]] = []
    for step in range(3):
        calls.append({"ev": "model", "phase": "start", "turn": turn, "step": step, "pid": 100, "mono": at + step})
        calls.append({"ev": "model", "phase": "end", "turn": turn, "step": step, "pid": 100, "mono": at + step + 0.1})
    for step in (1, 2):
        key = f"tool-{turn}-{step}"
        calls.append({"ev": "tool", "phase": "start", "turn": turn, "step": step, "key": key, "mono": at + step + 0.2})
        calls.append({"ev": "tool", "phase": "done", "turn": turn, "step": step, "key": key, "mono": at + step + 0.3})
    return calls


def clean_history() -> History:
    """Two work turns and a closing turn in one conversation, each answered once, persisted once, lock released."""
    turns = (*TURNS, "z")
    workload = Workload((CONVERSATION,), tuple(_turn(t, phase=CLOSING if t == "z" else "work") for t in turns))
    previous: list[str | None] = [None, *turns[:-1]]
    messages = [m for turn, before in zip(turns, previous, strict=True) for m in _messages(turn, before)]
    return History(
        settings=Settings(seed=1, store="redis", minutes=0.1),
        workload=workload,
        attempts=[_attempt(t, answer_for(t, p, 100, 3)) for t, p in zip(turns, previous, strict=True)],
        calls=[c for i, t in enumerate(turns) for c in _calls(t, 10.0 * i)],
        faults=[],
        final=FinalState(conversations={CONVERSATION: messages}, locks={CONVERSATION: None}),
    )


def kinds(history: History) -> dict[str, int]:
    return dict(check(history).by_kind())


def test_a_clean_history_has_no_violations_and_pays_three_model_calls_and_two_tool_runs_a_turn() -> None:
    report = check(clean_history(), baseline=Work(model_calls=9, tool_runs=6, acked=3))

    assert report.violations == []
    assert (report.acked, report.turns, report.unanswered) == (3, 3, [])
    assert report.work == Work(model_calls=9, tool_runs=6, acked=3)
    assert report.amplification() == (1.0, 1.0)


def test_an_acknowledged_turn_missing_from_its_conversation() -> None:
    history = clean_history()
    assert history.final is not None
    messages = history.final.conversations[CONVERSATION]
    # t2 rolled back after its client got the answer; z follows t1 and says so.
    history.final.conversations[CONVERSATION] = messages[:6] + _messages("z", "t1")
    history.attempts[-1]["text"] = answer_for("z", "t1", 100, 3)

    assert kinds(history) == {checker.ACKED_MISSING: 1}


def test_an_acknowledged_turn_persisted_twice() -> None:
    history = clean_history()
    assert history.final is not None
    history.final.conversations[CONVERSATION] += _messages("t2", "z")

    found = kinds(history)
    assert found[checker.ACKED_TWICE] == 1
    # The second run answered after another turn: clients were told one answer, the conversation holds two.
    assert found[checker.TWO_ANSWERS] == 1


def test_two_different_answers_for_one_key() -> None:
    history = clean_history()
    history.attempts.append(_attempt("t1", answer_for("t1", None, 200, 7), start=5.0))

    assert kinds(history) == {checker.TWO_ANSWERS: 1}


def test_an_answer_the_client_got_that_the_conversation_does_not_hold() -> None:
    history = clean_history()
    history.attempts[0]["text"] = answer_for("t1", None, 200, 7)  # another run's answer, rolled back since

    assert kinds(history) == {checker.TWO_ANSWERS: 1}


def test_an_answer_to_another_turn() -> None:
    history = clean_history()
    history.attempts.append(_attempt("t1", answer_for("t2", "t1", 100, 3), start=5.0))

    found = kinds(history)
    assert found[checker.WRONG_ANSWER] == 1


def test_a_dangling_tool_use() -> None:
    history = clean_history()
    assert history.final is not None
    # t2 cut off after its first tool call was persisted, never rolled back; z then follows it.
    history.final.conversations[CONVERSATION] = _messages("t1", None) + _messages("t2", "t1")[:2] + _messages("z", "t2")

    found = kinds(history)
    assert found == {checker.DANGLING_TOOL_USE: 1, checker.MALFORMED_TURN: 1}  # t2 ends without its answer


def test_messages_before_any_prompt_are_a_malformed_turn() -> None:
    history = clean_history()
    assert history.final is not None
    history.final.conversations[CONVERSATION] = _messages("t0", None)[1:] + history.final.conversations[CONVERSATION]

    found = kinds(history)
    assert found[checker.MALFORMED_TURN] == 1


def test_a_turn_with_an_extra_tool_cycle_is_malformed() -> None:
    history = clean_history()
    assert history.final is not None
    messages = history.final.conversations[CONVERSATION]
    history.final.conversations[CONVERSATION] = messages[:3] + messages[1:3] + messages[3:]

    assert kinds(history) == {checker.MALFORMED_TURN: 1}


def test_an_answer_given_on_a_stale_conversation() -> None:
    history = clean_history()
    assert history.final is not None
    stale = answer_for("t2", None, 100, 3)  # the model was not sent t1, persisted just before
    history.final.conversations[CONVERSATION][11]["content"] = [{"text": stale}]
    history.attempts[1]["text"] = stale

    assert kinds(history) == {checker.STALE_CONVERSATION: 1}


def test_a_tool_run_again_after_its_first_run_completed() -> None:
    history = clean_history()
    again = {"ev": "tool", "phase": "start", "turn": "t1", "step": 1, "key": "tool-t1-1", "mono": 50.0}
    history.calls.append(again)

    report = check(history)
    assert dict(report.by_kind()) == {checker.TOOL_RERUN: 1}
    assert report.uncertain_tool_reruns == 0


def test_a_tool_run_again_after_a_run_that_never_completed_is_uncertain_not_a_violation() -> None:
    history = clean_history()
    # The first run of t1's step 1 was killed mid-call (no done); the retry ran it to completion.
    first = {"ev": "tool", "phase": "start", "turn": "t1", "step": 1, "key": "tool-t1-1", "mono": 0.5}
    history.calls.insert(0, first)

    report = check(history)
    assert report.violations == []
    assert report.uncertain_tool_reruns == 1


def test_a_tool_without_a_key() -> None:
    history = clean_history()
    history.calls.append({"ev": "tool", "phase": "start", "turn": "t1", "step": 1, "key": None, "mono": 60.0})

    assert kinds(history) == {checker.TOOL_WITHOUT_KEY: 1}


def test_a_conversation_left_locked() -> None:
    history = clean_history()
    assert history.final is not None
    history.final.locks[CONVERSATION] = {"state": "IN_PROGRESS", "owner": "o-1"}

    assert kinds(history) == {checker.LEFT_LOCKED: 1}


def test_a_completed_lock_record_is_not_a_held_lock() -> None:
    history = clean_history()
    assert history.final is not None
    history.final.locks[CONVERSATION] = {"state": "COMPLETED", "owner": "o-1"}

    assert kinds(history) == {}


def test_a_closing_turn_without_an_answer_is_a_stuck_conversation() -> None:
    history = clean_history()
    history.attempts = [a for a in history.attempts if a["turn"] != "z"]
    history.attempts.append(_attempt("z", None, outcome="status:409"))

    assert kinds(history) == {checker.STUCK: 1}


def test_an_unanswered_work_turn_is_counted_not_a_violation() -> None:
    history = clean_history()
    assert history.final is not None
    history.attempts = [a for a in history.attempts if a["turn"] != "t2"]
    # t2 never ran: z follows t1.
    history.final.conversations[CONVERSATION] = _messages("t1", None) + _messages("z", "t1")
    history.attempts[-1]["text"] = answer_for("z", "t1", 100, 3)

    report = check(history)
    assert report.violations == []
    assert report.unanswered == ["t2"]


def test_without_a_final_state_only_the_history_is_checked() -> None:
    history = clean_history()
    history.final = None

    report = check(history)
    assert report.violations == []
    assert not report.checked_final_state


def test_faults_are_counted_by_kind_with_the_clients_hang_ups() -> None:
    history = clean_history()
    history.faults = [{"ev": "fault", "kind": KILL_TOOL, "mono": 1.0}] * 2
    history.attempts.append(_attempt("t1", None, outcome="hung_up"))

    assert dict(check(history).faults) == {KILL_TOOL: 2, DISCONNECT: 1}


def test_amplification_is_per_acknowledged_turn_against_the_baseline() -> None:
    history = clean_history()
    history.calls += _calls("t1", 100.0)[:2]  # one more model call (a takeover ran step 0 again)

    model, tool = check(history, baseline=Work(model_calls=30, tool_runs=20, acked=10)).amplification() or (0, 0)
    assert model == pytest.approx(10 / 9)
    assert tool == pytest.approx(1.0)
    assert check(history).amplification() is None


def test_a_history_read_back_from_its_files_is_judged_the_same(tmp_path: Path) -> None:
    history = clean_history()
    assert history.final is not None
    (tmp_path / SETTINGS).write_text(json.dumps(history.settings.as_dict()))
    (tmp_path / WORKLOAD).write_text(json.dumps(history.workload.as_dict()))
    (tmp_path / CLIENTS).write_text("".join(json.dumps(a) + "\n" for a in history.attempts))
    (tmp_path / FAULTS).write_text("")
    (tmp_path / FINAL).write_text(json.dumps(history.final.as_dict()))
    (tmp_path / EVENTS).mkdir()
    lines = "".join(json.dumps(c) + "\n" for c in history.calls)
    (tmp_path / EVENTS / "worker-0-0.jsonl").write_text(lines + '{"ev": "tool", "pha')  # torn by a SIGKILL

    loaded = load_history(tmp_path)

    assert check(loaded) == check(copy.deepcopy(history))


def test_the_workload_is_the_seeds() -> None:
    settings = Settings(seed=7, store="redis", minutes=0.5)

    assert make_workload(settings) == make_workload(Settings(seed=7, store="dynamodb", minutes=0.5, faults=False))
    assert make_workload(settings) != make_workload(Settings(seed=8, store="redis", minutes=0.5))
