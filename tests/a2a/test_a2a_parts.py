"""The pure parts of the A2A app: messages as prompts, ids and keys, errors, and JSON-RPC frames. No server."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from a2a.types import DataPart, FilePart, FileWithBytes, FileWithUri, Message, Part, Role, TextPart

from strands_py.a2a._convert import answer_artifact, answer_text, prompt_of
from strands_py.a2a._errors import (
    CONTENT_TYPE_NOT_SUPPORTED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MESSAGE_ID_MISMATCH,
    RpcError,
    ends_the_task,
    error_for,
)
from strands_py.a2a._ids import (
    check_context_id,
    check_message_id,
    derived_context_id,
    digest_of,
    key_in,
    parse_task_id,
    task_id_of,
)
from strands_py.a2a._rpc import event, event_stream
from strands_py.http._problems import (
    AGENT_FAILED,
    CANCELLED,
    KEY_MISMATCH,
    RUN_TIMEOUT,
    SESSION_BUSY,
    Problem,
    cancelled_problem,
)
from strands_py.idempotency.keys import make_key

PNG = base64.b64encode(b"\x89PNG...").decode()


def _message(*parts: Any) -> Message:
    return Message(role=Role.user, parts=[Part(root=part) for part in parts], message_id="m-1")


def _file(mime: str | None, name: str | None = "report.final.pdf", data: str = PNG) -> FilePart:
    return FilePart(file=FileWithBytes(bytes=data, mime_type=mime, name=name))


# -- messages as prompts -------------------------------------------------------------------------------------------


def test_one_text_part_is_the_prompt_itself_so_http_and_a2a_fingerprint_alike() -> None:
    assert prompt_of(_message(TextPart(text="Weather?"))) == "Weather?"


def test_parts_become_content_blocks() -> None:
    blocks = prompt_of(
        _message(
            TextPart(text="Look:"),
            TextPart(text=""),  # empty parts are dropped
            _file("image/png"),
            _file("video/mp4"),
            _file("application/pdf; charset=binary", name="Q3 report (final).v2.pdf"),
            _file("text/csv", name=None),
            FilePart(file=FileWithUri(uri="https://example.com/a.png", mime_type="image/png", name="a.png")),
            FilePart(file=FileWithUri(uri="s3://bucket/b")),
            DataPart(data={"b": 1, "a": "é"}),
        )
    )
    assert isinstance(blocks, list)
    assert blocks[0] == {"text": "Look:"}
    assert blocks[1] == {"image": {"format": "png", "source": {"bytes": b"\x89PNG..."}}}
    assert blocks[2]["video"]["format"] == "mp4"
    assert blocks[3]["document"] == {
        "format": "pdf",
        "name": "Q3 report (final) v2",
        "source": {"bytes": b"\x89PNG..."},
    }
    assert blocks[4]["document"]["name"] == "document"
    assert blocks[5] == {"text": "[file a.png (image/png) at https://example.com/a.png]"}
    assert blocks[6] == {"text": "[file  (unknown type) at s3://bucket/b]"}
    assert blocks[7] == {"text": json.dumps({"a": "é", "b": 1}, sort_keys=True, ensure_ascii=False)}


@pytest.mark.parametrize(
    ("parts", "code"),
    [
        ((TextPart(text=""),), INVALID_PARAMS),
        ((_file("image/png", data="not base64!"),), INVALID_PARAMS),
        ((_file("application/zip"),), CONTENT_TYPE_NOT_SUPPORTED),
        ((_file(None),), CONTENT_TYPE_NOT_SUPPORTED),
    ],
    ids=["empty", "bad-base64", "zip", "no-type"],
)
def test_messages_the_model_cannot_take_are_refused(parts: tuple[Any, ...], code: int) -> None:
    with pytest.raises(RpcError) as raised:
        prompt_of(_message(*parts))
    assert raised.value.code == code and raised.value.body()["data"]["detail"]


def test_the_answer_artifact_holds_the_text_and_the_structured_output() -> None:
    result = {"message": {"content": [{"text": "It is "}, {"toolUse": {}}, {"text": "sunny."}]}}
    assert answer_text(result) == "It is sunny."
    assert answer_text({"message": None}) == "" and answer_text({"message": {"content": "x"}}) == ""
    artifact = answer_artifact({**result, "structured_output": {"temperature": 21}})
    assert [part.root.kind for part in artifact.parts] == ["text", "data"]
    assert len(answer_artifact({**result, "structured_output": None}).parts) == 1


# -- ids -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_id", ["ctx-1", "é/ü?#", "a" * 1024, ""])
def test_a_task_id_names_its_key_digest_and_its_context(context_id: str) -> None:
    key = make_key("invocations/caller-1", "message-1")
    task_id = task_id_of(key, context_id)
    assert parse_task_id(task_id) == (digest_of(key), context_id)
    assert key_in("invocations/caller-1", digest_of(key)) == key


def test_the_context_of_a_message_without_one_is_the_same_for_every_retry() -> None:
    key = make_key("invocations", "message-1")
    assert derived_context_id(key) == derived_context_id(make_key("invocations", "message-1")) != "ctx-"
    assert derived_context_id(key) != derived_context_id(make_key("invocations", "message-2"))


@pytest.mark.parametrize(
    "task_id",
    [
        "",
        "short",
        "g" * 64 + "-Y3R4",  # not hex
        "0" * 64 + "+Y3R4",  # no dash
        "0" * 64 + "-Y3R4=",  # padding is never written
        "0" * 64 + "-Y",  # a length base64 never has
        "0" * 64 + "-Y3R",  # a non-canonical encoding of a shorter text
        "0" * 64 + "-_w",  # bytes that are not UTF-8
    ],
)
def test_anything_else_is_no_task_id_and_never_an_exception(task_id: str) -> None:
    assert parse_task_id(task_id) is None


def test_message_and_context_ids_are_checked() -> None:
    assert check_message_id("m-1") is None and check_context_id("c-1") is None
    assert "empty" in (check_message_id("") or "") and "empty" in (check_context_id("") or "")
    assert "longer" in (check_message_id("m" * 1025) or "")
    assert "longer" in (check_context_id("é" * 600) or "")
    assert "surrogate" in (check_message_id("\udcff") or "") and "surrogate" in (check_context_id("\udcff") or "")


# -- errors --------------------------------------------------------------------------------------------------------


def test_problems_map_onto_json_rpc_errors_with_the_problem_as_data() -> None:
    mismatch = error_for(Problem(422, KEY_MISMATCH, "t", "d"))
    assert mismatch.code == MESSAGE_ID_MISMATCH and "messageId" in mismatch.body()["data"]["detail"]
    busy = error_for(Problem(409, SESSION_BUSY, "t", "d", 3))
    assert busy.body()["data"]["retry_after"] == 3 and busy.body()["data"]["type"] == SESSION_BUSY
    unknown = error_for(Problem(500, "tag:unknown", "Odd", "odd"))
    assert unknown.code == INTERNAL_ERROR and unknown.message == "Odd" and unknown.body()["data"]["detail"] == "odd"
    assert RpcError(1, "m").body() == {"code": 1, "message": "m"}


def test_only_a_failed_timed_out_or_cancelled_agent_ends_its_task() -> None:
    assert ends_the_task(cancelled_problem())
    assert ends_the_task(Problem(500, AGENT_FAILED, "t", "d")) and ends_the_task(Problem(504, RUN_TIMEOUT, "t", "d"))
    assert not ends_the_task(Problem(409, SESSION_BUSY, "t", "d")) and CANCELLED


# -- frames --------------------------------------------------------------------------------------------------------


def test_a_keepalive_is_a_comment() -> None:
    assert event(1, None) == b": keepalive\n\n"


async def test_an_error_raised_mid_stream_is_the_stream_s_last_event() -> None:
    async def events() -> Any:
        yield {"kind": "status-update"}
        raise RpcError(-32053, "Unavailable")

    response = event_stream("r-1", events())
    frames = [frame async for frame in response.body_iterator]
    payloads = [json.loads(bytes(frame)[6:]) for frame in frames]  # type: ignore[arg-type]
    assert payloads[0]["result"] == {"kind": "status-update"} and payloads[-1]["error"]["code"] == -32053
    assert all(payload["id"] == "r-1" for payload in payloads)
