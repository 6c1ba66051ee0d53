"""Durable keys, fingerprints, tool-call keys and session lock keys: framing, scope, HMAC, odd tokens, stability."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from strands_py.idempotency import keys
from strands_py.idempotency.keys import make_key, request_fingerprint, session_lock_key, tool_call_key
from strands_py.types.exceptions import IdempotencyTokenError

HMAC_KEY = b"0123456789abcdef0123456789abcdef"
HEX64 = re.compile(r"[0-9a-f]{64}")


def _frame(*fields: bytes) -> bytes:
    """The documented framing, written independently of the module: 8-byte big-endian length, then the field."""
    return b"".join(struct.pack(">Q", len(f)) + f for f in fields)


def _unframe(material: bytes) -> list[bytes]:
    fields, offset = [], 0
    while offset < len(material):
        (length,) = struct.unpack_from(">Q", material, offset)
        offset += 8
        fields.append(material[offset : offset + length])
        offset += length
    assert offset == len(material)
    return fields


def _digest_of(key: str) -> str:
    return key.rpartition("#")[2]


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _circular() -> Any:
    value: list[Any] = []
    value.append(value)
    return value


def _causes(error: BaseException) -> list[type[BaseException]]:
    chain: list[type[BaseException]] = []
    cause = error.__cause__
    while cause is not None:
        chain.append(type(cause))
        cause = cause.__cause__
    return chain


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``==`` alone says ``1 == 1.0 == True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b) and a == b
    return bool(a == b)


# ---------------------------------------------------------------------------------------------------------------
# make_key


def test_key_is_scope_and_digest_of_the_documented_material() -> None:
    key = make_key("svc", "req-1")
    scope, _, digest = key.partition("#")
    assert scope == "svc" and HEX64.fullmatch(digest)
    material = _frame(b"strands-py/idempotency-key/v2", b"svc", b"sreq-1")
    assert digest == hashlib.sha256(material).hexdigest()
    assert _digest_of(make_key("svc", "req-1", HMAC_KEY)) == hmac.new(HMAC_KEY, material, hashlib.sha256).hexdigest()
    bytes_material = _frame(b"strands-py/idempotency-key/v2", b"svc", b"b\x00")
    assert _digest_of(make_key("svc", b"\x00")) == hashlib.sha256(bytes_material).hexdigest()
    json_material = _frame(b"strands-py/idempotency-key/v2", b"svc", b'j{"a":[1,2.5,true,null],"b":"\xc3\xa9"}')
    assert _digest_of(make_key("svc", {"b": "é", "a": [1, 2.5, True, None]})) == (
        hashlib.sha256(json_material).hexdigest()
    )


def test_keys_are_stable_across_processes_and_releases() -> None:
    # Pinned: a change here orphans every stored record. Hash randomisation differs per process, so a pinned value
    # also shows no per-process state takes part.
    assert make_key("svc", "req-1") == "svc#388a92943948e7b6a94a86340e5cdae816da04420cdb772d9bd857f862dc6594"
    assert make_key("svc", "req-1", b"k" * 32) == (
        "svc#f466bab7f503d0e6c80bce667e84f70ee78c1101ee4b37e17a79e10790c038ca"
    )


def test_token_types_stay_distinct_and_dicts_ignore_key_order() -> None:
    tokens: list[Any] = ["1", b"1", 1, 1.0, True, "true", None, "null", [1], {"a": 1}, '{"a":1}', b"s1"]
    assert len({make_key("s", t) for t in tokens}) == len(tokens)
    assert make_key("s", {"a": 1, "b": 2}) == make_key("s", {"b": 2, "a": 1})
    # Documented: the same canonical JSON is the same durable token.
    assert make_key("s", (1, 2)) == make_key("s", [1, 2])


def test_the_scope_is_inside_the_hashed_material() -> None:
    assert _digest_of(make_key("tenant-a", "req-1")) != _digest_of(make_key("tenant-b", "req-1"))
    assert request_fingerprint("tenant-a", "hi", {}) != request_fingerprint("tenant-b", "hi", {})
    assert _digest_of(session_lock_key("tenant-a", "s1")) != _digest_of(session_lock_key("tenant-b", "s1"))


def test_hmac_key_changes_every_digest() -> None:
    other = b"another key, also long enough...."
    for derive in (
        lambda k: make_key("s", "req-1", k),
        lambda k: request_fingerprint("s", "hi", {}, k),
        lambda k: tool_call_key("s#d", "pay", {"amount": 5}, 1, k),
        lambda k: session_lock_key("s", "session-1", k),
    ):
        digests = {_digest_of(derive(k)) for k in (None, b"", HMAC_KEY, other)}
        assert len(digests) == 4  # an empty key is still a key, not "no key"


def _naive_material(scope: str, token: Any) -> bytes:
    """Broken: scope and token concatenated without lengths."""
    return scope.encode() + keys._canonical_token(token)


@pytest.mark.parametrize(
    "material",
    [keys._key_material, pytest.param(_naive_material, marks=pytest.mark.xfail(strict=True, reason="no framing"))],
)
@pytest.mark.parametrize(("first", "second"), [(("as", "x"), ("a", "sx")), (("ab", b"c"), ("a", b"bc"))])
def test_scope_and_token_cannot_run_into_each_other(
    material: Callable[[str, Any], bytes], first: tuple[str, Any], second: tuple[str, Any]
) -> None:
    assert material(*first) != material(*second)


_TOKEN_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12,
)
_TOKENS = st.text() | st.binary() | _TOKEN_JSON


def _recover(material: bytes) -> tuple[str, Any]:
    """The left inverse of ``_key_material``: since it exists, no two (scope, token) pairs share a material."""
    label, scope, canonical = _unframe(material)
    assert label == b"strands-py/idempotency-key/v2"
    tag, body = canonical[:1], canonical[1:]
    token: Any = {b"s": lambda: body.decode(), b"b": lambda: body, b"j": lambda: json.loads(body)}[tag]()
    return scope.decode(), token


@settings(max_examples=400, derandomize=True, deadline=None)
@given(scope=st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1), token=_TOKENS)
def test_the_material_determines_scope_and_token(scope: str, token: Any) -> None:
    recovered_scope, recovered_token = _recover(keys._key_material(scope, token))
    assert recovered_scope == scope
    assert _same(recovered_token, token)


def _old_make_key(scope: str, token: Any) -> str:
    """Broken: the previous implementation, which let odd tokens escape with the wrong error."""
    if isinstance(token, str):
        canonical = b"s:" + token.encode("utf-8")
    elif isinstance(token, bytes):
        canonical = b"b:" + token
    else:
        try:
            canonical = b"j:" + json.dumps(token, sort_keys=True, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise IdempotencyTokenError("not JSON") from e
    return f"{scope}#{hashlib.sha256(canonical).hexdigest()}"


_ODD_TOKENS = [
    pytest.param("\ud800", UnicodeEncodeError, id="lone-surrogate"),
    pytest.param(["ok", {"k": "\udfff"}], UnicodeEncodeError, id="nested-lone-surrogate"),
    pytest.param(_deep(100_000), RecursionError, id="deep-list"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param([float("inf")], ValueError, id="infinity"),
    pytest.param({"x": -math.inf}, ValueError, id="minus-infinity"),
    pytest.param(10**5000, ValueError, id="int-too-long-to-print"),
    pytest.param(_circular(), ValueError, id="circular"),
    pytest.param(object(), TypeError, id="object"),
    pytest.param({1: "a", "b": 2}, TypeError, id="mixed-keys"),
    pytest.param(bytearray(b"1"), TypeError, id="bytearray"),
]


@pytest.mark.parametrize(
    "derive",
    [make_key, pytest.param(_old_make_key, marks=pytest.mark.xfail(strict=True, reason="raw errors escape"))],
)
@pytest.mark.parametrize(("token", "cause"), _ODD_TOKENS[:3])
def test_odd_tokens_raise_token_error_negative_control(
    derive: Callable[[str, Any], str], token: Any, cause: type[BaseException]
) -> None:
    with pytest.raises(IdempotencyTokenError):
        derive("s", token)


@pytest.mark.parametrize(("token", "cause"), _ODD_TOKENS)
def test_odd_tokens_raise_token_error_with_the_cause_chained(token: Any, cause: type[BaseException]) -> None:
    with pytest.raises(IdempotencyTokenError) as raised:
        make_key("s", token)
    assert cause in _causes(raised.value)
    assert not isinstance(raised.value, UnicodeError | RecursionError | ValueError)


def test_a_scope_that_is_not_text_is_a_value_or_type_error() -> None:
    with pytest.raises(ValueError, match="scope is not valid Unicode"):
        make_key("\ud800", "t")
    with pytest.raises(TypeError, match="scope must be a str"):
        make_key(b"s", "t")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# request_fingerprint


class Forecast(BaseModel):
    city: str
    degrees: int


def _other_forecast() -> type[BaseModel]:
    class Forecast(BaseModel):  # same name, another schema
        city: str

    return Forecast


def test_fingerprint_is_the_digest_of_the_documented_material() -> None:
    fingerprint = request_fingerprint("svc", "weather?", {"structured_output_prompt": None})
    canonical = b'{"prompt":"weather?","structured_output_prompt":null}'
    material = _frame(b"strands-py/request-fingerprint/v2", b"svc", canonical)
    assert fingerprint == hashlib.sha256(material).hexdigest()
    assert request_fingerprint("svc", "weather?", {"structured_output_prompt": None}, HMAC_KEY) == (
        hmac.new(HMAC_KEY, material, hashlib.sha256).hexdigest()
    )


def test_fingerprint_counts_bytes_by_hash_and_models_by_name_and_schema() -> None:
    def image(data: bytes) -> list[Any]:
        return [{"text": "what is this?"}, {"image": {"format": "png", "source": {"bytes": data}}}]

    assert request_fingerprint("s", image(b"\x89PNG1"), {}) == request_fingerprint("s", image(b"\x89PNG1"), {})
    assert request_fingerprint("s", image(b"\x89PNG1"), {}) != request_fingerprint("s", image(b"\x89PNG2"), {})
    with_model = request_fingerprint("s", "hi", {"structured_output_model": Forecast})
    assert with_model == request_fingerprint("s", "hi", {"structured_output_model": Forecast})
    assert with_model != request_fingerprint("s", "hi", {"structured_output_model": _other_forecast()})
    assert with_model != request_fingerprint("s", "hi", {})
    assert request_fingerprint("s", "hi", {}) != request_fingerprint("s", "hi!", {})


def test_fingerprint_tolerates_odd_but_printable_prompts() -> None:
    # Prompts are not tokens: a lone surrogate or NaN in a prompt still fingerprints, deterministically.
    assert request_fingerprint("s", "\ud800", {}) == request_fingerprint("s", "\ud800", {})
    assert HEX64.fullmatch(request_fingerprint("s", [{"json": {"x": float("nan")}}], {}))


def _old_request_fingerprint(scope: str, prompt: Any, options: dict[str, Any]) -> str:
    """Broken: the previous implementation, which let RecursionError escape."""
    canonical = json.dumps({"prompt": prompt, **options}, sort_keys=True, default=keys._fingerprint_default)
    return hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "fingerprint",
    [
        request_fingerprint,
        pytest.param(_old_request_fingerprint, marks=pytest.mark.xfail(strict=True, reason="RecursionError")),
    ],
)
@pytest.mark.parametrize(
    ("prompt", "cause"),
    [(_deep(100_000), RecursionError), (_circular(), ValueError), ([{"x": object()}], TypeError)],
    ids=["deep", "circular", "object"],
)
def test_unfingerprintable_prompts_are_a_type_error_that_says_what_to_do(
    fingerprint: Callable[..., str], prompt: Any, cause: type[BaseException]
) -> None:
    with pytest.raises(TypeError, match="validate_payload=False") as raised:
        fingerprint("s", prompt, {})
    assert cause in _causes(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# tool_call_key


def test_tool_call_key_is_the_digest_of_the_documented_material() -> None:
    key = tool_call_key("svc#abc", "pay", {"to": "x", "amount": 5}, 1)
    assert key == "ed2d7d4d22e9ffd1f2f401213e88eb0539ec227a1c172ef70a8c88b8904e8707"  # pinned: stable across runs
    material = _frame(b"strands-py/tool-call-key/v1", b"svc#abc", b"pay", b'{"amount":5,"to":"x"}', b"1")
    assert key == hashlib.sha256(material).hexdigest()
    assert tool_call_key("svc#abc", "pay", {"to": "x", "amount": 5}, 1, HMAC_KEY) == (
        hmac.new(HMAC_KEY, material, hashlib.sha256).hexdigest()
    )


def test_tool_call_keys_differ_by_durable_key_name_input_and_occurrence() -> None:
    variants = [
        ("s#a", "pay", {"amount": 5}, 1),
        ("s#b", "pay", {"amount": 5}, 1),
        ("s#a", "refund", {"amount": 5}, 1),
        ("s#a", "pay", {"amount": 6}, 1),
        ("s#a", "pay", {"amount": 5.0}, 1),
        ("s#a", "pay", {"amount": 5}, 2),
        ("s#a", "pay", {"amount": 5}, 10),
        ("s#a", "pay", None, 1),
        ("s#a", "pay", [], 1),
    ]
    found = [tool_call_key(*v) for v in variants]
    assert len(set(found)) == len(variants)
    assert all(HEX64.fullmatch(k) for k in found)
    assert tool_call_key("s#a", "pay", {"a": 1, "b": [1, 2]}, 3) == tool_call_key(
        "s#a", "pay", {"b": [1, 2], "a": 1}, 3
    )


@pytest.mark.parametrize(
    ("occurrence", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError), ("1", TypeError)]
)
def test_tool_call_key_validates_the_occurrence(occurrence: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="occurrence"):
        tool_call_key("s#a", "pay", {}, occurrence)


@pytest.mark.parametrize(
    "tool_input", [object(), {"x": float("nan")}, _deep(100_000), _circular(), {"s": "\ud800"}, {1: 1, "a": 2}]
)
def test_tool_input_that_is_not_json_is_a_type_error(tool_input: Any) -> None:
    with pytest.raises(TypeError) as raised:
        tool_call_key("s#a", "pay", tool_input, 1)
    assert raised.value.__cause__ is not None


def test_tool_names_and_durable_keys_must_be_text() -> None:
    with pytest.raises(ValueError, match="tool_name"):
        tool_call_key("s#a", "pay\ud800", {}, 1)
    with pytest.raises(TypeError, match="durable_key"):
        tool_call_key(None, "pay", {}, 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# session_lock_key


def test_session_lock_key_is_scope_and_digest_of_the_documented_material() -> None:
    key = session_lock_key("svc", "sess-1")
    assert key == "svc#session-474702f7d061a10532547d0647b5ce33fafd20219facee5673e9dc054fe48450"  # pinned
    scope, _, rest = key.partition("#")
    material = _frame(b"strands-py/session-lock-key/v1", b"svc", b"sess-1")
    assert (scope, rest) == ("svc", "session-" + hashlib.sha256(material).hexdigest())
    assert session_lock_key("svc", "sess-1", HMAC_KEY) == (
        "svc#session-" + hmac.new(HMAC_KEY, material, hashlib.sha256).hexdigest()
    )
    # Never the key of a token equal to the session id.
    assert _digest_of(key).removeprefix("session-") != _digest_of(make_key("svc", "sess-1"))
    assert session_lock_key("svc", "sess-2") != key


def test_session_ids_must_be_text() -> None:
    with pytest.raises(ValueError, match="session_id"):
        session_lock_key("svc", "\udc00")
    with pytest.raises(TypeError, match="session_id"):
        session_lock_key("svc", 7)  # type: ignore[arg-type]
