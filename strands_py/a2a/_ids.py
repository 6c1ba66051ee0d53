"""A2A ids and durable keys: a task id names its key's digest and its context, so any server sharing the store finds it.

- The idempotency token of a message is its ``messageId``: its durable key is the one an HTTP request of the same
  caller with ``Idempotency-Key: <messageId>`` has (``make_key(scope, messageId)``), so the two protocols share
  invocations.
- A task id is ``<digest>-<context>``: the 64 hex digits after the key's ``#`` (a keyed digest of the caller's scope
  and the messageId: nothing to learn from it, and the same on every server with the same scope and ``hmac_key``),
  then the context id in base64url (no padding). A server that never saw the task rebuilds the key from the
  caller's scope and the digest, and answers with the right context, without any state of its own. Another
  caller's scope makes another key of the same digest: a task id is useless outside its caller's scope.
- A message without a ``contextId`` gets ``ctx-<32 hex digits of the digest>``: the same for every retry.
"""

from __future__ import annotations

import base64
import binascii
import re

DIGEST_CHARS = 64
MAX_MESSAGE_ID_CHARS = 1024
MAX_CONTEXT_ID_BYTES = 1024
_DIGEST = re.compile("[0-9a-f]{64}")
_BASE64URL = re.compile("[A-Za-z0-9_-]*")


def digest_of(key: str) -> str:
    """The digest of a durable key (``scope#digest``): what a task id carries."""
    return key.rpartition("#")[2]


def derived_context_id(key: str) -> str:
    """The context of a message that names none: the same for every retry of it."""
    return f"ctx-{digest_of(key)[:32]}"


def task_id_of(key: str, context_id: str) -> str:
    """The id of the task of ``key`` in ``context_id``."""
    encoded = base64.urlsafe_b64encode(context_id.encode("utf-8")).decode("ascii").rstrip("=")
    return f"{digest_of(key)}-{encoded}"


def parse_task_id(task_id: str) -> tuple[str, str] | None:
    """``(digest, context id)`` of a task id of ours, or None for anything else (never an exception)."""
    if len(task_id) < DIGEST_CHARS + 1 or task_id[DIGEST_CHARS] != "-":
        return None
    digest, encoded = task_id[:DIGEST_CHARS], task_id[DIGEST_CHARS + 1 :]
    if not _DIGEST.fullmatch(digest) or not _BASE64URL.fullmatch(encoded) or len(encoded) % 4 == 1:
        return None
    try:
        context_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # Only the one encoding we write: two ids never name one task.
    return (digest, context_id) if task_id_of(f"#{digest}", context_id) == task_id else None


def key_in(scope: str, digest: str) -> str:
    """The durable key of ``digest`` in the caller's ``scope``."""
    return f"{scope}#{digest}"


def check_message_id(message_id: str) -> str | None:
    """What is wrong with a ``messageId`` as an idempotency token, or None."""
    if not message_id:
        return "messageId is empty."
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        return f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters."
    return _check_text(message_id, "messageId")


def check_context_id(context_id: str) -> str | None:
    """What is wrong with a ``contextId``, or None."""
    if not context_id:
        return "contextId is empty (leave it out to start a new context)."
    problem = _check_text(context_id, "contextId")
    if problem is None and len(context_id.encode("utf-8")) > MAX_CONTEXT_ID_BYTES:
        problem = f"contextId is longer than {MAX_CONTEXT_ID_BYTES} bytes."
    return problem


def _check_text(value: str, name: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} is not valid Unicode text (it holds a lone surrogate)."
    return None
