"""The stored record, and the replayed result type. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from strands.agent.agent_result import AgentResult


class RecordState(str, enum.Enum):
    """Where an invocation is: claimed and running somewhere, or completed with a replayable result."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True)
class IdempotencyRecord:
    """One token's record. Times are seconds since the epoch (``time.time()``), comparable across hosts.

    Attributes:
        key: ``scope#digest``, the digest of the scope and the token (SHA-256, or HMAC-SHA256 with the config's
            ``hmac_key``); the raw token is never stored.
        state: ``IN_PROGRESS`` or ``COMPLETED``.
        owner: Random id of the invocation that claimed the record; completes and releases are fenced on it.
        lease_expires_at: Until when an ``IN_PROGRESS`` claim is honoured; after it, another caller may take over.
        expires_at: When the record stops counting at all (also the DynamoDB TTL attribute).
        fingerprint: Digest of the scope and the request (SHA-256, or HMAC-SHA256 with ``hmac_key``), or None when
            payload validation is off; the raw prompt is never stored.
        payload: The encoded result of a ``COMPLETED`` record.
        checkpoint: Opaque text the owner attaches to its ``IN_PROGRESS`` record with ``renew`` (a session lock
            records there where the conversation stood when the turn began, so that a taker-over can roll back).
    """

    key: str
    state: RecordState
    owner: str
    lease_expires_at: float
    expires_at: float
    fingerprint: str | None = None
    payload: bytes | None = None
    checkpoint: str | None = None

    def is_live(self, now: float) -> bool:
        """Whether the record still decides what a call with its token does (not expired, lease not lapsed)."""
        if self.expires_at <= now:
            return False
        return self.state is RecordState.COMPLETED or self.lease_expires_at > now


@dataclass
class ReplayedAgentResult(AgentResult):
    """An ``AgentResult`` replayed from the idempotency store instead of produced by running the agent.

    ``message``, ``stop_reason``, token usage (``metrics.accumulated_usage``), ``interrupts`` (rebuilt as strands'
    ``Interrupt`` objects, so a client that missed the first answer can answer them) and ``structured_output``
    (rebuilt with the model the replaying call passes) are the original invocation's; other metrics are empty and
    ``state`` is ``{}``. ``isinstance(result, ReplayedAgentResult)`` tells a replay.

    Attributes:
        idempotency_key: The record's key.
    """

    idempotency_key: str = ""
