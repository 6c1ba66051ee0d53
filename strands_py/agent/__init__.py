"""The idempotent ``Agent``."""

from .agent import Agent

__all__ = ["Agent"]
