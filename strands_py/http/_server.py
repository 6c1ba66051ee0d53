"""Serving under uvicorn with a shutdown that drains the app's runs before it waits for open responses."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Protocol

import uvicorn


class Drainable(Protocol):
    """Anything with ``aclose()`` that ends its open responses (an ``AgentApp``)."""

    async def aclose(self) -> None:
        """Drain."""


class Server(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown first stops accepting connections, then drains the given apps.

    uvicorn waits for open responses before it sends the lifespan shutdown; an event stream following a long
    run would hold the shutdown until ``timeout_graceful_shutdown``. Draining first ends every stream with its
    run's last event (the result, or a 503 ``error`` for a run cancelled after the grace period).
    """

    def __init__(self, config: uvicorn.Config, drain: Sequence[Drainable] = ()) -> None:
        """A server for ``config`` that drains ``drain`` at shutdown."""
        super().__init__(config)
        self._drain = list(drain)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, drain the apps, then uvicorn's own shutdown (open responses, lifespan)."""
        for server in self.servers:
            server.close()
        for app in self._drain:
            await app.aclose()
        await super().shutdown(sockets)


def run(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    drain: Sequence[Drainable] | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve ``app`` under uvicorn until interrupted; like ``uvicorn.run``, with a draining shutdown.

    Args:
        app: An ``AgentApp``, or any ASGI app (a FastAPI app with an ``AgentApp`` mounted: pass it in ``drain``).
        host: Interface to bind.
        port: Port to bind.
        drain: Apps to drain at shutdown; default ``[app]`` when ``app`` has ``aclose``.
        **uvicorn_options: Other ``uvicorn.Config`` options (``log_level``, ``timeout_graceful_shutdown``, ...).
    """
    if drain is None:
        drain = [app] if callable(getattr(app, "aclose", None)) else []
    Server(uvicorn.Config(app, host=host, port=port, **uvicorn_options), drain).run()
