"""Durable keys and request fingerprints: what a token and a request become at rest. No I/O here."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from ..types.exceptions import IdempotencyTokenError


def make_key(scope: str, token: Any) -> str:
    """``scope#sha256(token)``.

    Tokens are hashed from a canonical form: a ``str`` from its UTF-8, ``bytes`` as they are, anything else from
    canonical JSON. So ``1``, ``1.0`` and ``True`` are three different durable keys (in-process they match by
    ``==``).

    Raises:
        IdempotencyTokenError: The token is not ``str``, ``bytes`` or JSON-serializable.
    """
    if isinstance(token, str):
        canonical = b"s:" + token.encode("utf-8")
    elif isinstance(token, bytes):
        canonical = b"b:" + token
    else:
        try:
            canonical = b"j:" + json.dumps(token, sort_keys=True, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise IdempotencyTokenError(
                f"durable idempotency needs a str, bytes or JSON-serializable token, got {type(token).__name__}"
            ) from e
    return f"{scope}#{hashlib.sha256(canonical).hexdigest()}"


def _fingerprint_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"model": value.__qualname__, "schema": value.model_json_schema()}
    raise TypeError(f"{type(value).__name__} is not part of a request fingerprint")


def request_fingerprint(prompt: Any, options: dict[str, Any]) -> str:
    """SHA-256 of the request: the prompt and the options that change the answer.

    Args:
        prompt: The call's prompt (str, content blocks, messages, or None); bytes (images, documents) count by hash.
        options: ``structured_output_model`` (by name and JSON schema) and ``structured_output_prompt``.

    Raises:
        TypeError: The prompt holds something that cannot be fingerprinted (set ``validate_payload=False``).
    """
    request = {"prompt": prompt, **options}
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_fingerprint_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
