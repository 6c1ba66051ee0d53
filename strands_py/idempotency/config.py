"""``IdempotencyConfig``: how an agent's invocations are made durable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..types.journal import UNCERTAIN_TOOL_POLICIES, UncertainTool
from ..types.session import SessionInvocationMode
from .base import IdempotencyStore
from .memory import InMemoryIdempotencyStore

# Bounds that keep every timestamp a store writes meaningful (DynamoDB numbers, Redis PXAT, float precision).
MAX_EXPIRES_AFTER_SECONDS = 366 * 24 * 3600.0
MAX_LEASE_SECONDS = 24 * 3600.0
MAX_WAIT_TIMEOUT_SECONDS = 24 * 3600.0
# Below this a lease cannot be renewed in time (renewals every lease / 3, each a store round trip).
MIN_LEASE_SECONDS = 0.3
# A model response or tool result larger than this is not journaled (it runs again on a resume).
DEFAULT_JOURNAL_MAX_STEP_BYTES = 4 * 1024 * 1024


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
        journal: Journal every completed step of a durable invocation (each model response, each tool result, and
            a "started" mark before each tool runs) in the store, so that an owner that takes a claim over resumes
            the run instead of paying for it again: journaled steps are served from the journal (no model call, no
            tool run) and the run goes live at the first step the journal lacks. None (the default): on when the
            store supports journals (every store of this package does). Costs one store write per model call and
            two per tool call; a completed invocation keeps only its result.
        journal_max_step_bytes: A step larger than this is not journaled (it runs again on a resume); steps larger
            than the store's item limit are split over several entries.
        uncertain_tools: Per tool name, what a resumed run does with a call that died mid-run (marked started, no
            result): ``"retry"``, ``"report"`` or a reconcile function (see ``strands_py.types.journal``).
        uncertain_tool_default: The policy of tools not in ``uncertain_tools``. Default ``"report"``: the library
            cannot know whether a tool's effect is safe to repeat, so it never repeats one silently; the model is
            told the outcome is unknown and decides (a read-only tool is better marked ``"retry"``).
    """

    store: IdempotencyStore = field(default_factory=InMemoryIdempotencyStore)
    expires_after_seconds: float = 3600.0
    lease_seconds: float = 30.0
    validate_payload: bool = True
    wait_timeout_seconds: float | None = None
    scope: str | None = None
    hmac_key: bytes | None = field(default=None, repr=False)
    session_invocation_mode: SessionInvocationMode | str = SessionInvocationMode.THROW
    journal: bool | None = None
    journal_max_step_bytes: int = DEFAULT_JOURNAL_MAX_STEP_BYTES
    uncertain_tools: Mapping[str, UncertainTool] = field(default_factory=dict, hash=False)
    uncertain_tool_default: UncertainTool = field(default="report", hash=False)

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            TypeError: ``store`` is not an ``IdempotencyStore``, or ``hmac_key`` is not bytes.
            ValueError: A duration is out of its bounds (see the attributes), ``scope`` is empty or contains ``#``,
                ``hmac_key`` is shorter than 16 bytes, ``session_invocation_mode`` is not throw / enqueue,
                ``journal=True`` with a store that has no journal, ``journal_max_step_bytes`` is not positive, or an
                uncertain-tool policy is neither "retry", "report" nor callable.
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
        if self.journal and not self.store.supports_journal:
            raise ValueError(f"journal=True, but {type(self.store).__name__} does not support journals")
        if isinstance(self.journal_max_step_bytes, bool) or not (
            isinstance(self.journal_max_step_bytes, int) and self.journal_max_step_bytes > 0
        ):
            raise ValueError(f"journal_max_step_bytes must be a positive int, got {self.journal_max_step_bytes!r}")
        for name, policy in [*self.uncertain_tools.items(), ("uncertain_tool_default", self.uncertain_tool_default)]:
            if policy not in UNCERTAIN_TOOL_POLICIES and not callable(policy):
                raise ValueError(f"the uncertain-tool policy of {name!r} must be 'retry', 'report' or callable")
        # A copy of our own: a config is shared by every agent (and request) given it, so later edits to the
        # caller's mapping must not change it.
        object.__setattr__(self, "uncertain_tools", dict(self.uncertain_tools))

    @property
    def journaled(self) -> bool:
        """Whether invocations under this configuration are journaled (``journal``, or None and supported)."""
        return self.store.supports_journal if self.journal is None else self.journal
