"""The stored record, its versions, and the replayed result type. No I/O here."""

from __future__ import annotations

import enum
import itertools
import os
import uuid
from dataclasses import dataclass

from strands.agent.agent_result import AgentResult


class RecordState(str, enum.Enum):
    """Where an invocation is: claimed and running somewhere, completed with a replayable result, or cancelled."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"  # a tombstone: the run was cancelled; it frees the key for a fresh claim at once


@dataclass(frozen=True)
class IdempotencyRecord:
    """One key's record: a token's claim or result, or a session's lock.

    Liveness is never judged by a clock. The owner of an ``IN_PROGRESS`` record gives it a new ``version`` at every
    write (claim, heartbeat); a waiter judges the owner gone only after it has seen the *same* version for a whole
    ``lease_seconds`` on its own monotonic clock, and then replaces exactly the record it judged (``take_over``, a
    compare-and-set on the version). Wall-clock time is used for one thing: ``expires_at``, when a record stops
    counting at all.

    Attributes:
        key: ``scope#digest``, the digest of the scope and the token (SHA-256, or HMAC-SHA256 with the config's
            ``hmac_key``); the raw token is never stored.
        state: ``IN_PROGRESS``, ``COMPLETED``, or ``CANCELLED`` (a tombstone saying how the run ended, until it
            expires; a claim replaces it at once).
        owner: Random id of the invocation that claimed the record; completes, releases and renewals are fenced on it.
        version: Unique to this write of the record (``new_version()``); the owner changes it at every heartbeat.
        lease_seconds: How long the owner of an ``IN_PROGRESS`` record may go without a heartbeat before a waiter may
            take over. 0 means *yielded*: the owner holds nothing any more, but left the record for the next holder to
            read (a session lock whose turn must still be judged); a waiter may take it over at once. 0 for
            ``COMPLETED`` records.
        expires_at: Seconds since the epoch on the writer's clock. A ``COMPLETED`` record is replayed until then; after
            it, a claim may replace it. An ``IN_PROGRESS`` record may be deleted by its store after it (garbage
            collection of abandoned claims: a running owner moves it forward at every heartbeat); no caller judges an
            ``IN_PROGRESS`` record by it.
        fingerprint: Digest of the scope and the request (SHA-256, or HMAC-SHA256 with ``hmac_key``), or None when
            payload validation is off; the raw prompt is never stored.
        payload: The encoded result of a ``COMPLETED`` record.
        checkpoint: Opaque text the owner attaches to its ``IN_PROGRESS`` record (a session lock records there where
            the conversation stood when the turn began, so that a taker-over can roll back).
        cancelled: On an ``IN_PROGRESS`` record: someone asked for the run to be cancelled (``cancel``). Its owner
            can no longer renew it, store a result or journal anything; it stops at its next heartbeat and leaves a
            ``CANCELLED`` tombstone.
    """

    key: str
    state: RecordState
    owner: str
    version: str
    lease_seconds: float
    expires_at: float
    fingerprint: str | None = None
    payload: bytes | None = None
    checkpoint: str | None = None
    cancelled: bool = False

    def expired(self, now: float) -> bool:
        """Whether a finished record's window is over at ``now`` (``time.time()``); never an ``IN_PROGRESS`` one.

        An ``IN_PROGRESS`` record is never judged by a clock: only by watching its version (see the class docstring).
        """
        return self.state is not RecordState.IN_PROGRESS and self.expires_at <= now

    @property
    def yielded(self) -> bool:
        """Whether this is an ``IN_PROGRESS`` record its owner gave up (``lease_seconds`` 0): takeable at once."""
        return self.state is RecordState.IN_PROGRESS and self.lease_seconds <= 0


# Versions: unique across processes (a random prefix per process) and writes (a counter), cheaper than a uuid each.
_VERSION_PREFIX = uuid.uuid4().hex[:16]
_version_counter = itertools.count()


def _redraw_version_prefix() -> None:
    # A process forked after this module was imported (gunicorn --preload, multiprocessing's fork) would otherwise
    # write the very versions its parent writes: a waiter could never tell their heartbeats apart.
    global _VERSION_PREFIX
    _VERSION_PREFIX = uuid.uuid4().hex[:16]


os.register_at_fork(after_in_child=_redraw_version_prefix)


def new_version() -> str:
    """A version no other write of any record, in any process, has or will have."""
    return f"{_VERSION_PREFIX}{next(_version_counter):x}"


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
