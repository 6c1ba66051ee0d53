"""Test your own idempotent agents and stores without AWS.

- ``ScriptedBedrock``: a real ``strands.models.BedrockModel`` whose boto3 client answers from a script (a tool-use
  cycle, then text), counting model and tool calls, optionally holding model calls at a gate.
- ``CountingStore``: wraps any ``IdempotencyStore`` and counts its primitives.
"""

from .bedrock import STUB_ANSWER, ScriptedBedrock
from .counting import CountingStore

__all__ = ["STUB_ANSWER", "CountingStore", "ScriptedBedrock"]
