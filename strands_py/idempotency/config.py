"""``IdempotencyConfig``: how an agent's invocations are made durable."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..types.session import SessionInvocationMode
from .base import IdempotencyStore
from .memory import InMemoryIdempotencyStore

# Bounds that keep every timestamp a store writes meaningful (DynamoDB numbers, Redis PXAT, float precision).
MAX_EXPIRES_AFTER_SECONDS = 366 * 24 * 3600.0
MAX_LEASE_SECONDS = 24 * 3600.0
MAX_WAIT_TIMEOUT_SECONDS = 24 * 3600.0
# Below this a lease cannot be renewed in time (renewals every lease / 3, each a store round trip).
MIN_LEASE_SECONDS = 0.3


def _check_seconds(name: str, value: object, low: float, high: float, *, low_inclusive: bool) -> None:
    # bool is an int: `lease_seconds=True` is a bug, not one second.
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g} and <= {high:g}"
        raise ValueError(f"{name} must be a number of seconds {bound}, got {value!r}")


@dataclass(frozen=True)
class IdempotencyConfig:
    """Durable idempotency for ``Agent(idempotency=...)``: replay after completion, across processes.

    Attributes:
        store: Where records live. Default: a new ``InMemoryIdempotencyStore`` (this process only). Use
            ``DynamoDBIdempotencyStore`` or ``RedisIdempotencyStore`` to deduplicate across processes and hosts.
            Agents given the very same store object (and the same scope) share in-flight invocations in-process.
        expires_after_seconds: How long a completed result is replayed for (at most 366 days).
        lease_seconds: How long a claim is honoured without a heartbeat. While the primary runs, a task on its
            event loop renews the lease every ``lease_seconds / 3``; a crashed owner's claim is taken over about
            one lease after its last renewal. No invocation is too long for its lease. At most 24 hours.
        validate_payload: Store a fingerprint of the request; the same token with a different request raises
            ``IdempotencyKeyMismatchError`` (in this process too, for a duplicate of a running invocation).
        wait_timeout_seconds: How long a call waits for another process's invocation of its token before raising
            ``IdempotencyWaitTimeoutError``; None waits until it completes or its lease lapses.
        scope: Namespace of the keys; records of different scopes never see each other. Default: derived from the
            agent (``name`` and ``agent_id``). Give each tenant, and each distinct agent, its own scope.
        hmac_key: Secret for keyed hashing. With it, keys and fingerprints at rest are HMAC-SHA256 of the scope and
            the token (or request), which nobody can confirm a guessed token or prompt against without the secret;
            without it they are plain SHA-256. Changing it orphans existing records (they are never found again and
            simply expire): rotate it only between deployments that may replay each other's results.
        session_invocation_mode: What a turn of a session-managed agent (or a call naming ``session_id=``) does
            while another request holds the session: ``"throw"`` raises ``SessionBusyError`` (HTTP 409) at once,
            ``"enqueue"`` waits in arrival order (at most ``wait_timeout_seconds``). Retries of the same request
            never queue: they join or replay.
    """

    store: IdempotencyStore = field(default_factory=InMemoryIdempotencyStore)
    expires_after_seconds: float = 3600.0
    lease_seconds: float = 30.0
    validate_payload: bool = True
    wait_timeout_seconds: float | None = None
    scope: str | None = None
    hmac_key: bytes | None = field(default=None, repr=False)
    session_invocation_mode: SessionInvocationMode | str = SessionInvocationMode.THROW

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            TypeError: ``store`` is not an ``IdempotencyStore``, or ``hmac_key`` is not bytes.
            ValueError: A duration is out of its bounds (see the attributes), ``scope`` is empty or contains ``#``,
                ``hmac_key`` is shorter than 16 bytes, or ``session_invocation_mode`` is not throw / enqueue.
        """
        if not isinstance(self.store, IdempotencyStore):
            raise TypeError(f"store must be an IdempotencyStore, got {type(self.store).__name__}")
        _check_seconds(
            "expires_after_seconds", self.expires_after_seconds, 0, MAX_EXPIRES_AFTER_SECONDS, low_inclusive=False
        )
        _check_seconds("lease_seconds", self.lease_seconds, MIN_LEASE_SECONDS, MAX_LEASE_SECONDS, low_inclusive=True)
        if self.wait_timeout_seconds is not None:
            _check_seconds(
                "wait_timeout_seconds", self.wait_timeout_seconds, 0, MAX_WAIT_TIMEOUT_SECONDS, low_inclusive=True
            )
        if self.scope is not None and (not isinstance(self.scope, str) or not self.scope or "#" in self.scope):
            raise ValueError(f"scope must be a non-empty string without '#', got {self.scope!r}")
        try:
            object.__setattr__(self, "session_invocation_mode", SessionInvocationMode(self.session_invocation_mode))
        except ValueError:
            raise ValueError(
                f"session_invocation_mode must be 'throw' or 'enqueue', got {self.session_invocation_mode!r}"
            ) from None
        if self.hmac_key is not None:
            if not isinstance(self.hmac_key, bytes):
                raise TypeError(f"hmac_key must be bytes, got {type(self.hmac_key).__name__}")
            if len(self.hmac_key) < 16:
                raise ValueError("hmac_key must be at least 16 bytes (use secrets.token_bytes(32))")
