"""``ServingOptions``: how an HTTP front runs and serves invocations; ``WebhookOptions``: how it delivers webhooks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServingOptions:
    """How invocations are run and served; see ``AgentApp`` for each option."""

    require_key: bool = True
    run_timeout_seconds: float = 900.0
    shutdown_grace_seconds: float = 10.0
    max_concurrent_runs: int = 1000
    max_buffered_events: int = 10_000
    retain_finished_runs: int = 256
    retain_finished_seconds: float = 60.0
    keepalive_seconds: float = 15.0
    retry_after_seconds: int = 1
    reconnect_millis: int = 1000

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: A duration is not a positive finite number, or a count is negative.
        """
        for name in ("run_timeout_seconds", "keepalive_seconds", "retain_finished_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.shutdown_grace_seconds) and self.shutdown_grace_seconds >= 0):
            raise ValueError(f"shutdown_grace_seconds must be >= 0, got {self.shutdown_grace_seconds!r}")
        for name in ("max_concurrent_runs", "max_buffered_events", "retain_finished_runs", "retry_after_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.reconnect_millis < 0:
            raise ValueError(f"reconnect_millis must be >= 0, got {self.reconnect_millis!r}")


@dataclass(frozen=True)
class WebhookOptions:
    """How webhook events are delivered (``AgentApp(webhook=..., webhook_options=...)``; see docs/webhooks.md).

    An event is POSTed until the receiver answers 2xx. A connection error, a timeout, 429 and 5xx are retried after a
    wait that doubles from ``first_retry_seconds`` up to ``max_retry_seconds`` (a random part of it, half to all: so
    that servers restarted together do not retry together), or after the receiver's ``Retry-After`` when it asks for
    longer; any other status (3xx, 4xx) is final. At most ``max_attempts`` attempts, none started later than
    ``give_up_after_seconds`` after the first: then the event is dropped, and logged.

    Attributes:
        timeout_seconds: One attempt's timeout (connecting, sending, and the receiver's answer).
        max_attempts: Attempts per event, the first included.
        first_retry_seconds: The wait before the first retry (then doubled at each retry).
        max_retry_seconds: The longest wait of the doubling (a ``Retry-After`` may ask for longer).
        give_up_after_seconds: No attempt starts later than this after the first.
        replay_grace_seconds: A server that replays a completed key (a client's retry) waits this long, then sends its
            ``invocation.completed`` event unless a server recorded it as delivered: an owner that stored its result
            but died before delivering it is covered by the next retry of its key, and an owner that is still
            delivering it is not doubled.
        max_pending: Events waiting or being delivered at once; beyond, new events are dropped (logged).
        max_concurrent: Attempts in flight at once (others wait for a slot, not counted in their timeout).
        drain_seconds: At shutdown, how long deliveries in progress may go on before they are cancelled.
        client_factory: Makes the ``httpx.AsyncClient`` deliveries use (a proxy, client certificates, a private CA, a
            test transport); called once per event loop, closed by the app at shutdown. Timeouts and redirects (never
            followed) are set per request. Default: ``httpx.AsyncClient()``.
    """

    timeout_seconds: float = 10.0
    max_attempts: int = 8
    first_retry_seconds: float = 1.0
    max_retry_seconds: float = 60.0
    give_up_after_seconds: float = 600.0
    replay_grace_seconds: float = 30.0
    max_pending: int = 10_000
    max_concurrent: int = 32
    drain_seconds: float = 5.0
    client_factory: Callable[[], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: A duration is not a finite number in range, or a count is below 1.
            TypeError: ``client_factory`` is not callable.
        """
        for name in ("timeout_seconds", "give_up_after_seconds"):
            _check_seconds(name, getattr(self, name), positive=True)
        for name in ("first_retry_seconds", "max_retry_seconds", "replay_grace_seconds", "drain_seconds"):
            _check_seconds(name, getattr(self, name), positive=False)
        for name in ("max_attempts", "max_pending", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.client_factory is not None and not callable(self.client_factory):
            raise TypeError(f"client_factory must be callable, got {type(self.client_factory).__name__}")


def _check_seconds(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = value > 0 if positive else value >= 0
    if not ok:
        raise ValueError(f"{name} must be a finite number of seconds {'> 0' if positive else '>= 0'}, got {value!r}")
