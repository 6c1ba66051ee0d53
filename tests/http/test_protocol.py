from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from strands_py.http._page import render_page
from strands_py.http._protocol import (
    ProblemError,
    is_valid_key,
    parse_idempotency_key,
    parse_invocation,
    parse_last_event_id,
    read_json_body,
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
        ("r:007", ("r", 7)),
        ("r:" + "9" * 18, ("r", 10**18 - 1)),
    ],
)
def test_last_event_id(value: str | None, parsed: tuple[str, int] | None) -> None:
    assert parse_last_event_id(value) == parsed


# Headers arrive decoded as Latin-1, so "²" (0xB2) comes from a single byte; the others from clients that send text.
GARBAGE_POSITIONS = ["r:²", "r:١٢", "r:" + "1" * 5000, "r:" + "9" * 19, "r:+5", "r:5_0", "r: 5", "r:٣"]


def _old_parse_last_event_id(value: str) -> tuple[str, int] | None:
    tag, sep, position = value.strip().rpartition(":")
    if not sep or not tag or not position.isdigit():
        return None
    return tag, int(position)


@pytest.mark.parametrize("value", GARBAGE_POSITIONS)
def test_last_event_id_that_is_not_ours_is_ignored(value: str) -> None:
    assert parse_last_event_id(value) is None


@pytest.mark.parametrize("value", ["r:²", "r:" + "1" * 5000])
def test_negative_control_isdigit_then_int_raises(value: str) -> None:
    with pytest.raises(ValueError):
        _old_parse_last_event_id(value)


def _request(headers: dict[str, str], body: bytes = b'{"prompt": "hi"}') -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""}, receive)


@pytest.mark.parametrize(
    ("length", "status"),
    [("²", None), ("1" * 5000, 413), ("9" * 19, 413), ("1001", 413), ("+5", None), (" 16 ", None), ("1e3", None)],
)
async def test_content_length_that_is_not_ascii_digits_or_too_long_is_never_a_crash(
    length: str, status: int | None
) -> None:
    request = _request({"content-type": "application/json", "content-length": length})
    if status is None:  # not ours to parse: the limit is enforced while reading
        assert await read_json_body(request, 1000) == {"prompt": "hi"}
        return
    with pytest.raises(ProblemError) as raised:
        await read_json_body(request, 1000)
    assert raised.value.problem.status == status


@pytest.mark.parametrize("quality", ["nan", "inf", "1e9", "-1", "2", "1.5", "0.1234", "١", "0x1", ""])
def test_quality_that_is_not_a_qvalue_is_not_acceptable(quality: str) -> None:
    assert wants_event_stream(f"text/event-stream;q={quality}, application/json;q=0.001") is False


@pytest.mark.parametrize("quality", ["1", "1.", "1.000", "0.5", "0.999", " 0.9 "])
def test_qvalues(quality: str) -> None:
    assert wants_event_stream(f"text/event-stream;q={quality}, application/json;q=0.001") is True


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
