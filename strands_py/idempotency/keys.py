"""Durable keys, request fingerprints and tool-call keys: what a token and a request become at rest. No I/O here.

What is hashed. Every digest is SHA-256 (HMAC-SHA256 when ``IdempotencyConfig(hmac_key=...)`` is set) of a
*material* made of length-prefixed fields, so no two inputs share a material (``("ab", "c")`` and ``("a", "bc")``
differ by their lengths):

- ``make_key``: a label, the scope, then the token's canonical form: a ``str`` as its UTF-8 (tagged ``s``),
  ``bytes`` as they are (tagged ``b``), anything else as canonical JSON (sorted keys, compact separators, tagged
  ``j``). So ``1``, ``1.0``, ``True``, ``"1"`` and ``b"1"`` are five different durable tokens (in-process they match
  by ``==``), while tokens with the same JSON are the same durable token (a tuple and a list with the same items).
- ``request_fingerprint``: a label, the scope, then the canonical JSON of the prompt and the options that change
  the answer (bytes in the prompt, e.g. images, count by their SHA-256; a structured output model by its name and
  JSON schema).
- ``tool_call_key``: a label, the durable key, the tool's name, the canonical JSON of its input and the occurrence
  of that (name, input) pair in the invocation.
- ``session_lock_key``: a label, the scope and the session id.

Why the scope is inside the material. A plain ``sha256(token)`` lets whoever reads the table (or a span's ``key``
attribute) link one token across scopes (tenants), and confirm a guessed token or a low-entropy prompt offline by
hashing candidates. With the scope inside, equal tokens of two scopes have unrelated digests; with an HMAC key,
nothing can be confirmed without the key.

Changing (or first setting) ``hmac_key`` changes every key: existing records are simply never found again, so a
retry of an invocation that completed before the change runs again; the orphaned records expire on their own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

from pydantic import BaseModel

from ..types.exceptions import IdempotencyTokenError

_LABEL_KEY = b"strands-py/idempotency-key/v2"
_LABEL_FINGERPRINT = b"strands-py/request-fingerprint/v2"
_LABEL_TOOL_CALL = b"strands-py/tool-call-key/v1"
_LABEL_SESSION = b"strands-py/session-lock-key/v1"

_TAG_STR = b"s"
_TAG_BYTES = b"b"
_TAG_JSON = b"j"


def _frame(*fields: bytes) -> bytes:
    """Each field preceded by its length (8 bytes, big-endian): the concatenation of fields is unambiguous."""
    return b"".join(struct.pack(">Q", len(field)) + field for field in fields)


def _digest(material: bytes, hmac_key: bytes | None) -> str:
    if hmac_key is None:
        return hashlib.sha256(material).hexdigest()
    return hmac.new(hmac_key, material, hashlib.sha256).hexdigest()


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (not valid Unicode text) is a ``ValueError`` naming ``what``."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from e


def _canonical_json(value: Any) -> bytes:
    """Canonical JSON as UTF-8: sorted keys, compact, finite numbers only.

    Raises:
        TypeError: ``value`` is not JSON (an unsupported type, NaN or infinity, a circular reference, an integer too
            long to print, a lone surrogate) or is nested too deeply; the original error is chained.
    """
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except RecursionError as e:
        raise TypeError("value is nested too deeply to be canonicalized") from e
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise TypeError(f"value is not canonical JSON: {e}") from e


def _canonical_token(token: Any) -> bytes:
    if isinstance(token, str):
        try:
            return _TAG_STR + token.encode("utf-8")
        except UnicodeEncodeError as e:
            raise IdempotencyTokenError(
                "idempotency token is not valid Unicode text (it holds a lone surrogate)"
            ) from e
    if isinstance(token, bytes):
        return _TAG_BYTES + token
    try:
        return _TAG_JSON + _canonical_json(token)
    except TypeError as e:
        raise IdempotencyTokenError(
            "durable idempotency needs a str, bytes or JSON token (finite numbers, str keys, not nested too deeply),"
            f" got {type(token).__name__}"
        ) from e


def _key_material(scope: str, token: Any) -> bytes:
    return _frame(_LABEL_KEY, _utf8(scope, "scope"), _canonical_token(token))


def make_key(scope: str, token: Any, hmac_key: bytes | None = None) -> str:
    """The durable key of ``token`` in ``scope``: ``scope#digest`` (64 hex characters after the ``#``).

    Args:
        scope: The namespace of the records (``IdempotencyConfig.scope``); also inside the hashed material.
        token: A ``str``, ``bytes``, or JSON value (``None``, bool, int, finite float, str, list, tuple, dict).
        hmac_key: With a key, the digest is HMAC-SHA256 (unconfirmable without the key); without, SHA-256.

    Raises:
        IdempotencyTokenError: The token cannot be made canonical: a lone surrogate in a string, NaN or infinity (JSON
            has neither), a type that is not JSON, a circular or too deeply nested value. The cause is chained.
        ValueError: ``scope`` holds a lone surrogate.
    """
    return f"{scope}#{_digest(_key_material(scope, token), hmac_key)}"


def _fingerprint_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"model": value.__qualname__, "schema": value.model_json_schema()}
    raise TypeError(f"{type(value).__name__} is not part of a request fingerprint")


def request_fingerprint(scope: str, prompt: Any, options: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """Digest of the request in ``scope``: the prompt and the options that change the answer (64 hex characters).

    Args:
        scope: The records' namespace; inside the hashed material, so equal prompts of two scopes do not match.
        prompt: The call's prompt (str, content blocks, messages, or None); bytes (images, documents) count by hash.
        options: ``structured_output_model`` (by name and JSON schema) and ``structured_output_prompt``.
        hmac_key: With a key, HMAC-SHA256 (a low-entropy prompt cannot be confirmed offline); without, SHA-256.

    Raises:
        TypeError: The prompt holds something that cannot be fingerprinted, or is circular or nested too deeply
            (set ``validate_payload=False`` to skip fingerprints). The cause is chained.
    """
    request = {"prompt": prompt, **options}
    try:
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_fingerprint_default)
    except RecursionError as e:
        raise TypeError(
            "the prompt is nested too deeply to be fingerprinted (set validate_payload=False to skip fingerprints)"
        ) from e
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"the prompt cannot be fingerprinted: {e} (set validate_payload=False to skip fingerprints)"
        ) from e
    # ensure_ascii (the default) makes ``canonical`` ASCII: encoding it cannot fail.
    return _digest(_frame(_LABEL_FINGERPRINT, _utf8(scope, "scope"), canonical.encode("ascii")), hmac_key)


def tool_call_key(
    durable_key: str, tool_name: str, tool_input: Any, occurrence: int, hmac_key: bytes | None = None
) -> str:
    """The idempotency key of one tool call of a durable invocation: 64 hex characters, usable as an HTTP header.

    The same invocation run again (after a takeover, in another process) calls the same tools with the same inputs
    in the same order, so each call gets the same key again; any other call gets another key.

    Args:
        durable_key: The invocation's durable key (``make_key(scope, token, hmac_key)``).
        tool_name: The tool's name.
        tool_input: The tool's input, hashed as canonical JSON (so key order does not matter).
        occurrence: Which call of this (name, input) pair in the invocation this is, from 1.
        hmac_key: With a key, HMAC-SHA256; without, SHA-256.

    Raises:
        ValueError: ``occurrence`` is below 1, or ``durable_key`` or ``tool_name`` holds a lone surrogate.
        TypeError: ``occurrence`` is not an int, or ``tool_input`` is not JSON (or is nested too deeply).
    """
    if isinstance(occurrence, bool) or not isinstance(occurrence, int):
        raise TypeError(f"occurrence must be an int, got {type(occurrence).__name__}")
    if occurrence < 1:
        raise ValueError(f"occurrence counts from 1, got {occurrence}")
    material = _frame(
        _LABEL_TOOL_CALL,
        _utf8(durable_key, "durable_key"),
        _utf8(tool_name, "tool_name"),
        _canonical_json(tool_input),
        str(occurrence).encode("ascii"),
    )
    return _digest(material, hmac_key)


def session_lock_key(scope: str, session_id: str, hmac_key: bytes | None = None) -> str:
    """The key of a session's lock record in ``scope``: ``scope#session-digest``; the raw session id is not stored.

    Args:
        scope: The records' namespace; inside the hashed material.
        session_id: The session's id.
        hmac_key: With a key, HMAC-SHA256; without, SHA-256.

    Raises:
        ValueError: ``scope`` or ``session_id`` holds a lone surrogate.
        TypeError: ``session_id`` is not a str.
    """
    material = _frame(_LABEL_SESSION, _utf8(scope, "scope"), _utf8(session_id, "session_id"))
    return f"{scope}#session-{_digest(material, hmac_key)}"
