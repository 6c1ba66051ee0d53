"""``ServingOptions``: how an HTTP front runs and serves invocations."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
