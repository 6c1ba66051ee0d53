from __future__ import annotations

import pytest

from strands_py.http._page import render_page
from strands_py.http._protocol import (
    ProblemError,
    is_valid_key,
    parse_idempotency_key,
    parse_invocation,
    parse_last_event_id,
    wants_event_stream,
)


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('  "padded"\t', "padded"),
        ('"with space"', "with space"),
        ('"escaped \\" and \\\\"', 'escaped " and \\'),
        ('"' + "x" * 255 + '"', "x" * 255),
        ("a=b:c/d", "a=b:c/d"),
    ],
)
def test_idempotency_key_forms(header: str, key: str) -> None:
    assert parse_idempotency_key([header]) == key


@pytest.mark.parametrize(
    "header",
    ['"open', '"a" b', '"a";p', '"bad \\n"', '"\x01"', '""', "", "a b", "a,b", "a;b", 'a"b', "a\\b", "é", "x" * 256],
)
def test_malformed_idempotency_keys(header: str) -> None:
    with pytest.raises(ProblemError) as raised:
        parse_idempotency_key([header])
    assert raised.value.problem.status == 400


def test_no_key_and_repeated_keys() -> None:
    assert parse_idempotency_key([]) is None
    with pytest.raises(ProblemError):
        parse_idempotency_key(['"a"', '"a"'])


def test_valid_keys() -> None:
    assert is_valid_key("a b") and is_valid_key("~" * 255)
    assert not is_valid_key("") and not is_valid_key("x" * 256) and not is_valid_key("\x7f") and not is_valid_key(1)


@pytest.mark.parametrize(
    ("accept", "sse"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/event-stream", True),
        ("TEXT/Event-Stream; charset=utf-8", True),
        ("application/json, text/event-stream", False),
        ("text/event-stream, application/json", False),
        ("text/event-stream, application/json;q=0.9", True),
        ("text/*, application/json;q=0.5", True),
        ("text/event-stream;q=0, */*", False),
        ("text/event-stream, */*;q=0.1", True),
        ("text/event-stream;q=oops", False),
        ("text/html", False),
    ],
)
def test_accept_negotiation(accept: str | None, sse: bool) -> None:
    assert wants_event_stream(accept) is sse


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),
        ("", None),
        ("12", None),
        ("abc:", None),
        (":3", None),
        ("abc:-1", None),
        ("abc:3", ("abc", 3)),
        ("a:b:7", ("a:b", 7)),
        (" r:2 ", ("r", 2)),
    ],
)
def test_last_event_id(value: str | None, parsed: tuple[str, int] | None) -> None:
    assert parse_last_event_id(value) == parsed


def test_invocation_shapes() -> None:
    assert parse_invocation({"prompt": "hi"}).prompt == "hi"
    blocks = [{"text": "x"}, {"document": {"format": "txt", "name": "d", "source": {"bytes": "aGk="}}}]
    assert parse_invocation({"prompt": blocks}).prompt == [
        {"text": "x"},
        {"document": {"format": "txt", "name": "d", "source": {"bytes": b"hi"}}},
    ]
    already = [{"image": {"format": "png", "source": {"s3Location": {"uri": "s3://b/k"}}}}]
    assert parse_invocation({"prompt": already}).prompt == already
    assert parse_invocation({"prompt": "hi", "k": 1}, frozenset({"k"})).prompt == "hi"
    with pytest.raises(ProblemError, match="Unknown fields: k"):
        parse_invocation({"prompt": "hi", "k": 1})


def test_page_escapes_its_base_path() -> None:
    page = render_page("/a</script><script>alert(1)//")
    assert "</script><script>alert" not in page
    assert 'const BASE = "/a\\u003c/script>\\u003cscript>alert(1)";' in page
    assert 'const BASE = "";' in render_page("/")
