"""The persisted conversation of a session-managed agent: re-read it, checkpoint it, roll it back.

Strands' ``RepositorySessionManager`` (``FileSessionManager``, ``S3SessionManager``, custom repositories) restores
an agent's conversation when the agent is built, which for an Agent per request happens before any lock: under the
session lock the conversation is read again. A turn's checkpoint is where the persisted conversation stood when the
turn began (the next message id, and the persisted agent record); rolling back deletes the messages the turn wrote
and restores the agent record, so a crashed turn leaves no trace.

Repository calls are blocking, as strands' own session hooks are; they run inline on the caller's loop.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from strands.session.repository_session_manager import RepositorySessionManager
from strands.types.session import SessionAgent

logger = logging.getLogger(__name__)

_CHECKPOINT_VERSION = 1
# The checkpoint travels in the lock record; past this, only the message position is kept (state is not rolled back).
_MAX_AGENT_SNAPSHOT_BYTES = 64 * 1024


def session_manager_of(agent: Any) -> Any:
    """The agent's session manager, or None."""
    return getattr(agent, "_session_manager", None)


def session_id_of(agent: Any) -> str | None:
    """The persistent session id of the agent's session manager, or None when it has none."""
    manager = session_manager_of(agent)
    session_id = getattr(manager, "session_id", None) if manager is not None else None
    return session_id if isinstance(session_id, str) and session_id else None


class _Conversation:
    """One agent's persisted conversation in one session, through a ``RepositorySessionManager``.

    Managers of other kinds are locked but neither re-read nor rolled back (logged once per agent).
    """

    def __init__(self, agent: Any) -> None:
        """Bind to ``agent``'s session manager."""
        self.agent = agent
        manager = session_manager_of(agent)
        self.manager: RepositorySessionManager | None = (
            manager if isinstance(manager, RepositorySessionManager) else None
        )
        if manager is not None and self.manager is None:
            logger.warning(
                "session_manager=<%s> | not a RepositorySessionManager: the session is locked, but its conversation "
                "is neither re-read under the lock nor rolled back after a crash",
                type(manager).__name__,
            )

    def reload(self) -> None:
        """Read the conversation again from the repository (under the lock: what was read before may be stale)."""
        manager, agent = self.manager, self.agent
        if manager is None:
            return
        # RepositorySessionManager.initialize refuses an agent it already initialized; forget it, then restore.
        manager._latest_agent_message.pop(agent.agent_id, None)
        held = getattr(manager, "_held_records", None)
        if isinstance(held, dict):
            held.pop(agent.agent_id, None)
        manager._last_synced_internal_state.pop(agent.agent_id, None)
        manager._is_new_session = False
        manager.initialize(agent)

    def position(self) -> int:
        """The id the next persisted message will get (the number of messages ever persisted for this agent)."""
        if self.manager is None:
            return len(self.agent.messages)
        latest = self.manager._latest_agent_message.get(self.agent.agent_id)
        return 0 if latest is None else int(latest.message_id) + 1

    def checkpoint(self, token_key: str | None) -> str:
        """Where the conversation stands now, as the text a lock record carries."""
        document: dict[str, Any] = {"v": _CHECKPOINT_VERSION, "messages": self.position(), "token": token_key}
        manager = self.manager
        if manager is not None:
            stored = manager.session_repository.read_agent(manager.session_id, self.agent.agent_id)
            if stored is not None:
                snapshot = json.dumps(stored.to_dict(), separators=(",", ":"), default=str)
                if len(snapshot) <= _MAX_AGENT_SNAPSHOT_BYTES:
                    document["agent"] = json.loads(snapshot)
                else:
                    logger.warning(
                        "agent_id=<%s>, bytes=<%d> | agent record too large for the checkpoint: a rollback restores "
                        "the messages but not the agent state",
                        self.agent.agent_id,
                        len(snapshot),
                    )
        return json.dumps(document, separators=(",", ":"))

    def rollback(self, checkpoint: str, still_ours: Callable[[], None]) -> None:
        """Restore the persisted conversation to ``checkpoint``, then re-read it.

        ``still_ours`` raises once the lock this rollback runs under is lost: it is called before every write. A
        repository has no fence of its own, so a holder paused (or slowed) past its lease must find out before each
        deletion, not once before them all: by then the next holder may have rolled the same turn back and written
        its own messages at the very ids this one is about to delete.

        Raises:
            ValueError: The checkpoint is not one of ours.
            IdempotencyLeaseLostError: From ``still_ours``: the lock was lost; what was not yet written stays.
        """
        document = json.loads(checkpoint)
        if not isinstance(document, dict) or document.get("v") != _CHECKPOINT_VERSION:
            raise ValueError("not a strands-py session checkpoint")
        keep = int(document["messages"])
        manager = self.manager
        if manager is None:
            return
        removed = self._delete_messages_from(keep, still_ours)
        if "agent" in document:
            still_ours()
            manager.session_repository.update_agent(manager.session_id, SessionAgent.from_dict(document["agent"]))
        logger.info(
            "agent_id=<%s>, kept=<%d>, removed=<%d> | rolled back a crashed turn", self.agent.agent_id, keep, removed
        )
        self.reload()

    def _delete_messages_from(self, keep: int, still_ours: Callable[[], None]) -> int:
        manager = self.manager
        assert manager is not None
        repository: Any = manager.session_repository
        session_id, agent_id = manager.session_id, self.agent.agent_id
        doomed = [m.message_id for m in repository.list_messages(session_id, agent_id) if m.message_id >= keep]
        delete = getattr(repository, "delete_message", None)
        for message_id in doomed:
            still_ours()
            if callable(delete):
                delete(session_id, agent_id, message_id)
            elif hasattr(repository, "storage_dir"):  # FileSessionManager
                path = repository._get_message_path(session_id, agent_id, message_id)
                if os.path.exists(path):
                    os.remove(path)
            elif hasattr(repository, "bucket") and hasattr(repository, "client"):  # S3SessionManager
                key = repository._get_message_path(session_id, agent_id, message_id)
                repository.client.delete_object(Bucket=repository.bucket, Key=key)
            else:
                logger.warning(
                    "repository=<%s> | cannot delete messages (give it a delete_message(session_id, agent_id, "
                    "message_id) method): the crashed turn's messages stay",
                    type(repository).__name__,
                )
                return 0
        return len(doomed)
