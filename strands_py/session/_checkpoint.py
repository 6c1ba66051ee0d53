"""What a session lock record's checkpoint says: the turn's token, the verdict it carries, a committed marker.

A checkpoint is a small JSON document (``{"v": 1, "token": ..., "messages": ..., "pending": ...}``); a malformed one
reads as empty, so a corrupted lock record is judged like a lock without a turn rather than failing every waiter.
"""

from __future__ import annotations

import json
from typing import Any

from ..idempotency.record import IdempotencyRecord

# The checkpoint of a turn without a token that ended and counts: neither "messages" nor "pending".
COMMITTED = json.dumps({"v": 1, "token": None, "committed": True}, separators=(",", ":"))


def read_checkpoint(checkpoint: str | None) -> dict[str, Any]:
    """A lock record's checkpoint as a JSON object (empty when absent or malformed)."""
    try:
        document = json.loads(checkpoint or "{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def token_of_checkpoint(checkpoint: str) -> str | None:
    """The token key a lock checkpoint names, if any."""
    token = read_checkpoint(checkpoint).get("token")
    return token if isinstance(token, str) else None


def token_of(record: IdempotencyRecord) -> str | None:
    """The token key a lock record names, if any."""
    return token_of_checkpoint(record.checkpoint or "")


def pending_of(record: IdempotencyRecord) -> dict[str, str] | None:
    """The verdict a lock record carries: the turn to roll back (``{"owner", "checkpoint"}``), or None."""
    pending = read_checkpoint(record.checkpoint).get("pending")
    if (
        isinstance(pending, dict)
        and isinstance(pending.get("owner"), str)
        and isinstance(pending.get("checkpoint"), str)
    ):
        return {"owner": pending["owner"], "checkpoint": pending["checkpoint"]}
    return None
