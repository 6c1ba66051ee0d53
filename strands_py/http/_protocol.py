"""What a request says: the Idempotency-Key header, Accept, Last-Event-ID, and the JSON body. No I/O but the body."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ._problems import BODY_TOO_LARGE, INVALID_BODY, KEY_INVALID, UNSUPPORTED_MEDIA_TYPE, Problem

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255

# Numbers in headers: ASCII digits only (str.isdigit and int accept other scripts' digits, and int() of a very long
# one raises), at most 18 of them, so that int() of a match always works and fits in 64 bits.
_DIGITS = re.compile("[0-9]{1,18}")
# RFC 9110 section 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")

# Content blocks whose `source.bytes` travels as base64 in JSON (as in the Bedrock Converse JSON API).
_BINARY_BLOCKS = ("image", "document", "video")
_BODY_FIELDS = frozenset({"prompt", "interrupt_responses"})
_RESPONSE_FIELDS = frozenset({"interrupt_id", "response"})


class ProblemError(Exception):
    """A request that cannot be served; carries the problem the client gets."""

    def __init__(self, problem: Problem) -> None:
        """Wrap ``problem``."""
        super().__init__(problem.detail)
        self.problem = problem


def _invalid_key(detail: str) -> ProblemError:
    return ProblemError(Problem(400, KEY_INVALID, "Invalid Idempotency-Key", detail))


def parse_idempotency_key(values: list[str]) -> str | None:
    """The key of the ``Idempotency-Key`` header fields, or None when there is none.

    The draft (draft-ietf-httpapi-idempotency-key-header) makes the field a Structured Field Item whose value is
    an sf-string: ``Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"``. Many deployed clients (Stripe's
    libraries among them) send the bare value instead, so an unquoted value is accepted too and names the same
    key: ``Idempotency-Key: 8e03978e-...`` equals the quoted form. Keys are 1 to 255 printable ASCII characters
    (space included when quoted). Parameters and lists are refused.

    Raises:
        ProblemError: 400, the field is repeated or malformed.
    """
    if not values:
        return None
    if len(values) > 1:
        raise _invalid_key("Send exactly one Idempotency-Key header.")
    value = values[0].strip(" \t")
    key = _parse_sf_string(value) if value.startswith('"') else _parse_bare(value)
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise _invalid_key(f"An Idempotency-Key has 1 to {MAX_KEY_LENGTH} characters.")
    return key


def is_valid_key(key: object) -> bool:
    """Whether ``key`` is an idempotency key: a string of 1 to 255 printable ASCII characters (space included)."""
    return isinstance(key, str) and 1 <= len(key) <= MAX_KEY_LENGTH and all(" " <= char <= "~" for char in key)


def _parse_sf_string(value: str) -> str:
    """RFC 8941 section 4.2.5: a quoted string of printable ASCII, with a backslash escaping a quote or itself."""
    chars: list[str] = []
    index = 1
    while index < len(value):
        char = value[index]
        if char == "\\":
            index += 1
            if index == len(value) or value[index] not in '"\\':
                raise _invalid_key('Inside a quoted Idempotency-Key only \\" and \\\\ are escapes.')
            chars.append(value[index])
        elif char == '"':
            if index != len(value) - 1:
                raise _invalid_key("Nothing may follow the quoted Idempotency-Key (no parameters, no lists).")
            return "".join(chars)
        elif not " " <= char <= "~":
            raise _invalid_key("An Idempotency-Key consists of printable ASCII characters.")
        else:
            chars.append(char)
        index += 1
    raise _invalid_key("The quoted Idempotency-Key has no closing quote.")


def _parse_bare(value: str) -> str:
    """The unquoted form: visible ASCII, none of the characters that would make it a list, parameters or string."""
    if any(not "!" <= char <= "~" or char in '"\\,;' for char in value):
        raise _invalid_key(
            'Quote the Idempotency-Key as a structured-field string (Idempotency-Key: "...") to use spaces or '
            'any of " \\ , ; in it; it consists of printable ASCII characters.'
        )
    return value


def wants_event_stream(accept: str | None) -> bool:
    """Whether ``Accept`` prefers ``text/event-stream`` over ``application/json`` (ties and no header: JSON)."""
    if not accept:
        return False
    sse = json_ = (0.0, -1)  # (quality, specificity of the range that matched)
    for part in accept.split(","):
        media_range, _, params = part.strip().partition(";")
        media_range = media_range.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                # Not a qvalue ("oops", "nan", "1e9", "-1"): not acceptable, rather than a guess.
                quality = float(value) if _QVALUE.fullmatch(value.strip()) else 0.0
        sse = max(sse, _match(media_range, "text/event-stream", quality), key=lambda m: m[1])
        json_ = max(json_, _match(media_range, "application/json", quality), key=lambda m: m[1])
    return sse[0] > 0 and (sse[0] > json_[0] or (sse[0] == json_[0] and sse[1] > json_[1]))


def _match(media_range: str, media_type: str, quality: float) -> tuple[float, int]:
    """(quality, specificity) of ``media_range`` for ``media_type``; specificity -1 when it does not match."""
    if media_range == media_type:
        return quality, 2
    if media_range == media_type.split("/")[0] + "/*":
        return quality, 1
    if media_range == "*/*":
        return quality, 0
    return 0.0, -1


def parse_last_event_id(value: str | None) -> tuple[str, int] | None:
    """``<run>:<position>`` from a ``Last-Event-ID`` header; None when absent or not one of ours.

    Anything else is ignored, never an error: ``EventSource`` sends back whatever id it saw last, and a client that
    sends an id that is not ours gets the whole sequence. ``position`` is ASCII digits only (``str.isdigit`` also
    accepts ``"²"``, which ``int`` refuses), at most 18 of them (no run has more events; ``int`` refuses a very long
    one).
    """
    if not value:
        return None
    tag, sep, position = value.strip().rpartition(":")
    if not sep or not tag or _DIGITS.fullmatch(position) is None:
        return None
    return tag, int(position)


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """Read the body (at most ``max_bytes``, enforced while reading) and parse it as JSON.

    Raises:
        ProblemError: 415 not JSON by its Content-Type, 413 over the limit, 400 not valid JSON.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    is_json = media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if not is_json:
        raise ProblemError(
            Problem(415, UNSUPPORTED_MEDIA_TYPE, "Unsupported media type", "Send the body as application/json.")
        )
    too_large = ProblemError(
        Problem(413, BODY_TOO_LARGE, "Request body too large", f"The request body is limited to {max_bytes} bytes.")
    )
    declared = request.headers.get("content-length", "").strip()
    # Servers check Content-Length before the app sees it; behind one that does not, a length that is not ours to
    # parse is left to the limit enforced while reading, and more digits than _DIGITS takes is too large anyway.
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _invalid_body("The request body is not valid JSON.") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _invalid_body(detail: str) -> ProblemError:
    return ProblemError(Problem(400, INVALID_BODY, "Invalid request body", detail))


@dataclass(frozen=True)
class Invocation:
    """A validated request to invoke the agent.

    Attributes:
        prompt: A string, or a list of content blocks (``bytes`` of image, document and video sources decoded from
            base64); for an answer to interrupts, strands' resume prompt, one ``{"interruptResponse": {"interruptId",
            "response"}}`` block per answer.
        answers: Whether the request answers interrupts (``interrupt_responses``) rather than prompting.
    """

    prompt: str | list[dict[str, Any]]
    answers: bool = False


def parse_invocation(body: Any, extra_fields: frozenset[str] = frozenset()) -> Invocation:
    """Validate ``{"prompt": str | [content block, ...]}`` or ``{"interrupt_responses": [answer, ...]}``.

    Exactly one of the two. An answer is ``{"interrupt_id": str, "response": JSON}``: ``response`` is required and
    not ``null`` (strands takes a ``None`` response for no answer, and would ask again), and an interrupt is
    answered at most once per request. Unknown fields are refused rather than ignored, so that a field added later
    can never silently change what an old server does with a request (and what its fingerprint covers).

    Args:
        body: The parsed JSON body.
        extra_fields: Fields the caller handles itself (the AgentCore adapter's key field); ignored here.

    Raises:
        ProblemError: 400, with what is wrong.
    """
    if not isinstance(body, dict):
        raise _invalid_body('The body is a JSON object: {"prompt": ...} or {"interrupt_responses": [...]}.')
    unknown = sorted(set(body) - _BODY_FIELDS - extra_fields)
    if unknown:
        raise _invalid_body(
            f"Unknown fields: {', '.join(unknown)[:200]}. The body has one field, prompt or interrupt_responses."
        )
    if ("prompt" in body) == ("interrupt_responses" in body):
        raise _invalid_body("The body has exactly one of prompt and interrupt_responses.")
    if "interrupt_responses" in body:
        return Invocation(_answers(body["interrupt_responses"]), answers=True)
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return Invocation(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(block, dict) and block for block in prompt):
        return Invocation([_decode_block(block) for block in prompt])
    raise _invalid_body("prompt is a non-empty string or a non-empty list of content blocks (JSON objects).")


def _decode_block(block: dict[str, Any]) -> dict[str, Any]:
    """A content block with the base64 ``source.bytes`` of an image, document or video decoded to ``bytes``."""
    for kind in _BINARY_BLOCKS:
        media = block.get(kind)
        source = media.get("source") if isinstance(media, dict) else None
        if isinstance(source, dict) and isinstance(source.get("bytes"), str):
            try:
                data = base64.b64decode(source["bytes"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise _invalid_body(f"{kind}.source.bytes is not valid base64.") from e
            block = {**block, kind: {**media, "source": {**source, "bytes": data}}}  # type: ignore[dict-item]
    return block


def _answers(items: Any) -> list[dict[str, Any]]:
    """``interrupt_responses`` as strands' resume prompt (one ``interruptResponse`` block per answer)."""
    shape = 'interrupt_responses is a non-empty list of {"interrupt_id": str, "response": JSON other than null}.'
    if not isinstance(items, list) or not items:
        raise _invalid_body(shape)
    blocks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or set(item) != _RESPONSE_FIELDS:
            raise _invalid_body(shape)
        interrupt_id, response = item["interrupt_id"], item["response"]
        if not isinstance(interrupt_id, str) or not interrupt_id or response is None:
            raise _invalid_body(shape)
        if interrupt_id in seen:
            raise _invalid_body("interrupt_responses answers an interrupt twice.")
        seen.add(interrupt_id)
        blocks.append({"interruptResponse": {"interruptId": interrupt_id, "response": response}})
    return blocks
