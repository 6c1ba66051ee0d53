"""``IdempotencyConfig``: how an agent's invocations are made durable."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .base import IdempotencyStore
from .memory import InMemoryIdempotencyStore


@dataclass(frozen=True)
class IdempotencyConfig:
    """Durable idempotency for ``Agent(idempotency=...)``: replay after completion, across processes.

    Attributes:
        store: Where records live. Default: a new ``InMemoryIdempotencyStore`` (this process only). Use
            ``DynamoDBIdempotencyStore`` to deduplicate across processes and hosts.
        expires_after_seconds: How long a completed result is replayed for.
        lease_seconds: How long an in-progress claim is honoured; after it, another caller may take over (the
            owner is presumed crashed). Set it above your longest invocation.
        validate_payload: Store a fingerprint of the request; the same token with a different request raises
            ``IdempotencyKeyMismatchError``.
        wait_timeout_seconds: How long a call waits for another process's invocation of its token before raising
            ``IdempotencyWaitTimeoutError``; None waits until it completes or its lease lapses.
        scope: Namespace of the keys; records of different scopes never see each other. Default: derived from the
            agent (``name`` and ``agent_id``). Give each tenant, and each distinct agent, its own scope.
    """

    store: IdempotencyStore = field(default_factory=InMemoryIdempotencyStore)
    expires_after_seconds: float = 3600.0
    lease_seconds: float = 900.0
    validate_payload: bool = True
    wait_timeout_seconds: float | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            TypeError: ``store`` is not an ``IdempotencyStore``.
            ValueError: A duration is not a positive finite number (``wait_timeout_seconds`` may be 0), or
                ``scope`` is empty or contains ``#``.
        """
        if not isinstance(self.store, IdempotencyStore):
            raise TypeError(f"store must be an IdempotencyStore, got {type(self.store).__name__}")
        for name in ("expires_after_seconds", "lease_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        timeout = self.wait_timeout_seconds
        if timeout is not None and not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"wait_timeout_seconds must be None or a non-negative number, got {timeout!r}")
        if self.scope is not None and (not self.scope or "#" in self.scope):
            raise ValueError(f"scope must be a non-empty string without '#', got {self.scope!r}")
