"""``dumps``: whatever an agent's events hold becomes JSON text that encodes as UTF-8; it never raises.

Negative control: ``json.dumps`` as the wire used it before (``ensure_ascii=False``, then UTF-8) fails, or writes
what is not JSON, on each of these values.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics

from strands_py.http._problems import run_timeout_problem
from strands_py.http._runs import Run
from strands_py.http._wire import _json_default, dumps

WAIT = 5.0
SURROGATE = b"out-\xfe\xff".decode("utf-8", "surrogateescape")


class _Model(BaseModel):
    x: int


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def _circular() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


# (value, what the client's json.loads gives)
CASES: dict[str, tuple[Any, Any]] = {
    "lone surrogates": ({"text": SURROGATE, SURROGATE: 1}, {"text": SURROGATE, SURROGATE: 1}),
    "key that is not a str": ({(1, 2): "a", "b": [SURROGATE]}, {"(1, 2)": "a", "b": [SURROGATE]}),
    "not a number": ({"x": float("nan"), "y": [float("-inf")]}, {"x": "nan", "y": ["-inf"]}),
    "integer too long to print": ({"n": 10**5000}, {"n": f"<int of {(10**5000).bit_length()} bits>"}),
    "circular": ({"c": _circular()}, {"c": [1, "<circular>"]}),
    "unprintable": (
        {"u": _Unprintable(), "k": {1: 2}, "m": _Model(x=1)},
        {"u": "<_Unprintable>", "k": {"1": 2}, "m": {"x": 1}},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_dumps_serves_what_json_cannot_hold(case: str) -> None:
    value, expected = CASES[case]
    text = dumps(value)
    assert "\n" not in text
    assert json.loads(text.encode("utf-8").decode("utf-8")) == expected


@pytest.mark.parametrize("case", CASES)
def test_negative_control_the_old_encoding_fails_on_each(case: str) -> None:
    value, _ = CASES[case]
    try:
        data = json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":")).encode()
    except Exception:
        return
    with pytest.raises(ValueError):  # written, but not JSON: NaN and Infinity are JavaScript, not JSON
        json.loads(data, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


def test_dumps_of_deep_nesting_is_bounded_and_shared_values_are_not_cycles() -> None:
    assert json.loads(dumps(_deep(10)))  # within bounds: exact
    assert dumps(_deep(10)) == json.dumps(_deep(10), separators=(",", ":"))
    text = dumps(_deep(100_000))  # past what json.dumps can recurse: cut, with a marker where it was cut
    assert text.endswith('["..."]' + "]" * 199)
    shared = ["x"]
    assert json.loads(dumps({"a": shared, "b": shared, "c": {1: shared}})) == {
        "a": ["x"],
        "b": ["x"],
        "c": {"1": ["x"]},
    }


def test_plain_text_is_kept_as_is() -> None:
    assert dumps({"é": "ü 😀"}) == '{"é":"ü 😀"}'
    assert dumps({"a": SURROGATE}) == '{"a":"out-\\udcfe\\udcff"}'


async def test_a_run_whose_messages_json_cannot_hold_still_ends_with_its_result() -> None:
    message = {"role": "user", "content": [{"toolResult": {"content": [{"json": {"loop": _circular()}}]}}]}
    result = AgentResult(
        stop_reason="end_turn",
        message={"role": "assistant", "content": [{"text": SURROGATE}]},
        metrics=EventLoopMetrics(),
        state={},
    )

    async def stream() -> AsyncIterator[Any]:
        yield {"data": SURROGATE}
        yield {"message": message}
        yield {"result": result}

    async def open_stream() -> AsyncIterator[Any]:
        return stream()

    run = Run("k", None, 100)
    run.start(
        open_stream,
        timeout_problem=run_timeout_problem(WAIT),
        timeout_seconds=WAIT,
        retry_after=1,
        on_settled=lambda _: None,
    )
    await asyncio.wait_for(run.wait(lambda r: r.settled), WAIT)
    assert run.succeeded and run.problem is None
    assert json.loads(run.result_json or "")["text"] == SURROGATE + "\n"
    events, _, _ = run.read(0)
    assert [e.name for e in events] == ["data", "message", "result"]
    for event in events:
        json.loads(event.frame.decode("utf-8").split("data: ", 1)[1])


@pytest.mark.parametrize(
    "chunk",
    ["", "plain", 'quote " and \\ backslash', "line\nbreak\ttab\x00nul", "é 漢字 🙂", SURROGATE, "\ud800", "\udfff x"],
)
def test_a_chunk_of_text_is_the_same_json_as_any_other_value(chunk: str) -> None:
    # {"text": str}, the most frequent event, has a path of its own: it must write what the general path writes.
    fast = dumps({"text": chunk})
    general = dumps({"text": chunk, "other": 1})
    assert fast == general.replace(',"other":1', "")
    assert json.loads(fast) == {"text": chunk}
    fast.encode("utf-8")  # always valid UTF-8


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a chunk pasted between quotes")
def test_negative_control_a_chunk_pasted_between_quotes_is_not_the_same_json() -> None:
    chunk = 'quote " and \\ backslash'
    assert '{"text":"' + chunk + '"}' == dumps({"text": chunk, "other": 1}).replace(',"other":1', "")
