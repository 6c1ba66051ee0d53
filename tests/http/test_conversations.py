"""Conversations' pure parts: scoped storage ids, the agent factory check, query parameters, lines, lock states."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from strands_py.http import INVALID_PARAMETER
from strands_py.http._lines import SessionLines
from strands_py.http._protocol import ProblemError
from strands_py.http._runs import Run
from strands_py.http._scopes import session_storage_id
from strands_py.http._sessions import _int_parameter, check_agent_factory
from strands_py.idempotency import IdempotencyRecord, RecordState
from strands_py.session._state import lock_state

WAIT = 5.0


def test_storage_ids_are_scoped_keyed_and_safe_as_names() -> None:
    ada = session_storage_id("invocations/caller-a", "conv-1", None)
    assert ada == session_storage_id("invocations/caller-a", "conv-1", None)  # stable: the same conversation
    others = {
        session_storage_id("invocations/caller-b", "conv-1", None),  # another caller
        session_storage_id("invocations/caller-a", "conv-2", None),  # another conversation
        session_storage_id("invocations/caller-a", "conv-1", b"k" * 32),  # another HMAC key
        # The scope is framed by its length: a scope and an id never compose another pair's material.
        session_storage_id("invocations/caller-a" + "conv", "-1", None),
    }
    assert ada not in others and len(others) == 4
    assert ada.startswith("conv-") and len(ada) == 37 and ada[5:].isalnum()
    assert session_storage_id("s", "../../etc", None).isascii()


def test_the_agent_factory_must_take_a_session_manager_keyword() -> None:
    def keyword(request: Any, session_manager: Any = None) -> None: ...

    def keyword_only(request: Any, *, session_manager: Any) -> None: ...

    def anything(request: Any, **options: Any) -> None: ...

    def without(request: Any) -> None: ...

    def positional_only(request: Any, session_manager: Any, /) -> None: ...

    class Factory:
        def __call__(self, request: Any, session_manager: Any = None) -> None: ...

    class Unreadable:  # its signature cannot be read: trusted (its call fails clearly if it is wrong)
        __signature__ = "not a signature"

        def __call__(self, request: Any) -> None: ...

    for accepted in (keyword, keyword_only, anything, Factory(), Unreadable()):
        check_agent_factory(accepted)
    for refused in (without, positional_only):
        with pytest.raises(TypeError, match="session_manager"):
            check_agent_factory(refused)


@pytest.mark.parametrize(("value", "expected"), [(None, 7), ("", 7), ("0", 0), ("12", 12), ("500", 500)], ids=str)
def test_query_numbers(value: str | None, expected: int) -> None:
    assert _int_parameter(value, "limit", 7, 0, 500) == expected


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "²", "501", "9" * 13, " 1"])
def test_query_numbers_refused(value: str) -> None:
    with pytest.raises(ProblemError) as raised:
        _int_parameter(value, "limit", 7, 0, 500)
    assert raised.value.problem.type == INVALID_PARAMETER and "limit" in raised.value.problem.detail


async def test_a_line_serves_its_turns_in_arrival_order() -> None:
    lines = SessionLines()
    first, second, third = (lines.join("c", "conv") for _ in range(3))
    for place in (first, second, third):
        place.run = Run(f"k{id(place)}", None, 1)
    assert [p.position() for p in (first, second, third)] == [0, 1, 2] and lines.busy("c")
    await asyncio.wait_for(first.turn(), WAIT)  # the head's turn has come
    waiting = asyncio.ensure_future(third.turn())
    second.leave()  # a queued turn cancelled: nobody is served, the rest move up
    assert third.position() == 1 and not waiting.done()
    first.run._finish_ok({"text": "done"})
    first.leave()
    await asyncio.wait_for(waiting, WAIT)  # third heads the line now
    assert third.position() == 0 and lines.last_completed("c") == (first.run.key, first.run.finished_wall)
    third.leave()
    third.leave()  # twice is once
    assert not lines.busy("c") and lines.places("c") == [] and first.position() == 0


async def test_a_line_waiting_for_another_server_counts_its_turn_until_its_head_starts() -> None:
    lines = SessionLines()
    head = lines.join("c", "conv", elsewhere=True)
    head.run = Run("k1", None, 1)
    behind = lines.join("c", "conv")
    behind.run = Run("k2", None, 1)
    assert (head.position(), behind.position()) == (1, 2)  # another server's turn is ahead of both
    head.run._decide(replayed=False)  # the head got the conversation
    assert (head.position(), behind.position()) == (0, 1)
    assert lines.last_completed("other") is None


def _lock(**fields: Any) -> IdempotencyRecord:
    values: dict[str, Any] = {"state": RecordState.IN_PROGRESS, "lease_seconds": 4.0, "expires_at": 2e9, **fields}
    return IdempotencyRecord(key="s#session-x", owner="owner", version="v", **values)


def _checkpoint(**document: Any) -> str:
    return json.dumps({"v": 1, **document})


@pytest.mark.parametrize(
    ("record", "held", "token", "unjudged"),
    [
        (None, False, None, False),
        (_lock(checkpoint=_checkpoint(token="s#t", messages=3)), True, "s#t", False),
        (_lock(checkpoint=None), True, None, False),
        (_lock(lease_seconds=0.0, checkpoint=_checkpoint(token=None, committed=True)), False, None, False),
        (_lock(lease_seconds=0.0, checkpoint=_checkpoint(token="s#t", messages=3)), False, "s#t", True),
        (
            _lock(lease_seconds=0.0, checkpoint=_checkpoint(pending={"owner": "o", "checkpoint": "{}"})),
            False,
            None,
            True,
        ),
        (_lock(state=RecordState.COMPLETED), False, None, False),
    ],
    ids=["none", "held", "held-no-checkpoint", "committed", "yielded-mid-turn", "pending", "not-a-lock"],
)
def test_what_a_lock_record_says(
    record: IdempotencyRecord | None, held: bool, token: str | None, unjudged: bool
) -> None:
    state = lock_state(record)
    assert (state.held, state.token_key, state.unjudged) == (held, token, unjudged)
    assert state.lease_seconds == (4.0 if held else 0.0)
