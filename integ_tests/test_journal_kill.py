"""SIGKILL a process at each step of a journaled turn; the retry on another process resumes it, paying nothing twice.

The turn (``journal_worker.py``): four model calls and three tools, a session turn persisted in a shared directory,
the store on a real redis-server or the serialised moto server. Process A is stopped for good at one point of the
turn and killed; process B retries the same token and must finish the turn with:

- every model call and tool run paid once, except the one step that was in flight when A died: a model call whose
  response did not exist yet is made again, and a tool that died mid-run is run again (its policy here is
  ``retry``, so that the conversation can be compared with an uncrashed one);
- the persisted conversation equal, message for message, to that of an uncrashed run.

Without the journal (the control) the retry pays the whole turn again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _moto import running_moto
from _servers import running_redis
from strands.session.file_session_manager import FileSessionManager

WORKER = str(Path(__file__).with_name("journal_worker.py"))
WAIT = 90.0
# Per store: a renewal must never miss a whole lease on a busy machine (the serialised moto server answers slowly
# under load), yet a killed owner's claim must lapse soon, since every case waits for it once.
LEASES = {"redis": 1.5, "dynamodb": 4.0}
TABLE = "journal-integ"

pytestmark = pytest.mark.racing  # several OS processes racing for one claim and one session


@pytest.fixture(scope="module", params=["redis", "dynamodb"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "redis":
        with running_redis() as server:
            yield {"store": "redis", "url": server.url}
    else:
        with running_moto(TABLE) as server:
            yield {"store": "dynamodb", "url": server.url, "table": TABLE}


class _Turn:
    """One turn's directory: its conversation, its ledger, and the processes that ran it."""

    def __init__(self, tmp_path: Path, store: dict[str, str], *, journal: bool = True) -> None:
        self.dir = tmp_path
        self.sessions = str(tmp_path / "sessions")
        self.ledger = str(tmp_path / "ledger")
        self.token = uuid.uuid4().hex
        self.base = {
            **store,
            "sessions": self.sessions,
            "ledger": self.ledger,
            "token": self.token,
            "lease_seconds": LEASES[store["store"]],
            "journal": journal,
        }

    def start(self, name: str, **config: Any) -> subprocess.Popen[str]:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps({**self.base, **config}))
        return subprocess.Popen(
            [sys.executable, WORKER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def lines(self) -> list[str]:
        try:
            with open(self.ledger) as f:
                return [line.split(" ", 1)[1].strip() for line in f if " " in line]
        except FileNotFoundError:
            return []

    def paid(self) -> tuple[int, Counter[str]]:
        """Model calls, and runs per tool, across every process."""
        lines = self.lines()
        return sum(1 for line in lines if line.startswith("model ")), Counter(
            line.split()[1] for line in lines if line.startswith("tool ")
        )

    def messages(self) -> list[Any]:
        manager = FileSessionManager(session_id="conv-1", storage_dir=self.sessions)
        return [
            {"role": m.to_message()["role"], "content": m.to_message()["content"]}
            for m in manager.list_messages("conv-1", "default")
        ]


def _finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=WAIT)
        raise AssertionError(f"the worker did not finish in {WAIT}s: {err[-3000:]}") from None
    assert process.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def _stop_and_kill(turn: _Turn, point: str) -> None:
    """Run process A to ``point``, then SIGKILL it."""
    dead = turn.start("a", stop_at=point)
    try:
        deadline = time.monotonic() + WAIT
        while f"stopped {point}" not in turn.lines():
            if dead.poll() is not None:
                raise AssertionError(f"process A ended before {point}: {dead.stderr.read() if dead.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError(f"process A never reached {point}")
            time.sleep(0.05)  # polling a file the worker fsyncs: the wait is bounded above, not a synchronisation
    finally:
        os.kill(dead.pid, signal.SIGKILL)
        dead.communicate(timeout=WAIT)


@pytest.fixture(scope="module")
def reference(store: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The conversation of the same turn, uncrashed."""
    turn = _Turn(tmp_path_factory.mktemp("reference"), store)
    assert _finish(turn.start("only"))["answer"] == "Paid a, b and c."
    model_calls, tools = turn.paid()
    assert (model_calls, dict(tools)) == (4, {"pay_a": 1, "pay_b": 1, "pay_c": 1})
    return turn.messages()


POINTS = [
    ("model:1", 1, None),
    ("before-tool:pay_a", 0, None),
    ("tool:pay_a", 0, "pay_a"),
    ("after-tool:pay_a", 0, None),
    ("model:2", 1, None),
    ("tool:pay_b", 0, "pay_b"),
    ("after-tool:pay_b", 0, None),
    ("model:4", 1, None),
]


@pytest.mark.parametrize(("point", "models_in_flight", "tool_in_flight"), POINTS, ids=[p[0] for p in POINTS])
def test_a_killed_turn_resumes_paying_only_the_step_in_flight(
    store: dict[str, str],
    reference: list[Any],
    tmp_path: Path,
    point: str,
    models_in_flight: int,
    tool_in_flight: str | None,
) -> None:
    turn = _Turn(tmp_path, store)
    _stop_and_kill(turn, point)
    assert _finish(turn.start("b"))["answer"] == "Paid a, b and c."
    model_calls, tools = turn.paid()
    expected_tools = {"pay_a": 1, "pay_b": 1, "pay_c": 1}
    if tool_in_flight is not None:
        expected_tools[tool_in_flight] += 1
    print(f"\n{store['store']} {point}: model calls {model_calls}, tool runs {dict(tools)}")
    assert model_calls == 4 + models_in_flight
    assert dict(tools) == expected_tools
    assert turn.messages() == reference


def test_without_the_journal_the_retry_pays_the_turn_again(store: dict[str, str], tmp_path: Path) -> None:
    # The control: journal=False, killed inside the second tool. The retry rolls the turn back and runs it all.
    turn = _Turn(tmp_path, store, journal=False)
    _stop_and_kill(turn, "tool:pay_b")
    assert _finish(turn.start("b"))["answer"] == "Paid a, b and c."
    model_calls, tools = turn.paid()
    print(f"\n{store['store']} without the journal: model calls {model_calls}, tool runs {dict(tools)}")
    assert model_calls == 2 + 4 and dict(tools) == {"pay_a": 2, "pay_b": 2, "pay_c": 1}


def _tool_result_text(messages: list[Any], tool_use_id: str) -> str:
    for message in messages:
        for block in message["content"]:
            result = block.get("toolResult")
            if result is not None and result["toolUseId"] == tool_use_id:
                return "".join(part.get("text", "") for part in result["content"])
    raise AssertionError(f"no result for {tool_use_id}")


@pytest.mark.parametrize("policy", ["report", "reconcile"])
def test_an_uncertain_tool_is_reported_or_reconciled_not_run_again(
    store: dict[str, str], tmp_path: Path, policy: str
) -> None:
    turn = _Turn(tmp_path, store)
    turn.base["uncertain"] = policy
    _stop_and_kill(turn, "tool:pay_b")
    assert _finish(turn.start("b"))["answer"] == "Paid a, b and c."
    model_calls, tools = turn.paid()
    assert model_calls == 4 and dict(tools) == {"pay_a": 1, "pay_b": 1, "pay_c": 1}, "the uncertain tool ran again"
    shown = _tool_result_text(turn.messages(), "call-2")
    expected = "outcome of this tool call is unknown" if policy == "report" else "reconciled: paid 200 cents"
    assert expected in shown, shown


def test_a_changed_agent_is_never_answered_from_the_journal(store: dict[str, str], tmp_path: Path) -> None:
    # Between the crash and the retry the agent got one more tool: every model request differs from the journaled
    # ones, so no model step is replayed (the retry runs the turn live, on the rolled-back conversation); the tool
    # calls it asks for again are the very same calls (same tool-call keys), answered from the journal, not re-run.
    turn = _Turn(tmp_path, store)
    _stop_and_kill(turn, "after-tool:pay_b")
    assert _finish(turn.start("b", extra_tool=True))["answer"] == "Paid a, b and c."
    model_calls, tools = turn.paid()
    assert model_calls == 2 + 4 and dict(tools) == {"pay_a": 1, "pay_b": 1, "pay_c": 1}
    assert [m["role"] for m in turn.messages()] == ["user", "assistant", "user", "assistant", "user"] + [
        "assistant",
        "user",
        "assistant",
    ]
