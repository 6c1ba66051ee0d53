"""The turn layer: one durable invocation's orchestration, above the session and store layers.

A token's claim (or the wait for its owner, or the takeover from an owner judged gone), the session lock, the
heartbeats, the run, and settling its outcome (storing the result and committing the turn as one shielded unit).
"""

from ._claim import DurableCall
from ._run import durable_stream, locked_stream

__all__ = ["DurableCall", "durable_stream", "locked_stream"]
