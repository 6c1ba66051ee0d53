"""``python -m strands_py serve``: an ``AgentApp`` under uvicorn, the scripted demo agent by default."""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvicorn
from starlette.requests import Request

from ..agent.agent import Agent
from ..idempotency.base import IdempotencyStore
from ..idempotency.config import IdempotencyConfig
from ..idempotency.memory import InMemoryIdempotencyStore
from ..types.session import SessionInvocationMode
from ._app import AgentApp
from ._demo import demo_agent_factory
from ._server import Server
from ._sessions import SessionManagerFactory

STORE_HELP = (
    "where idempotency records live: memory (default; this process only), "
    "dynamodb://TABLE?region=REGION&endpoint_url=URL, or redis://HOST:PORT/DB (rediss:// for TLS)"
)


def add_parser(commands: Any) -> None:
    """Add the ``serve`` command to the subparsers ``commands``."""
    serve = commands.add_parser(
        "serve",
        help="serve an agent over HTTP (Idempotency-Key, Server-Sent Events, a chat page at /)",
        description=(
            "Serve agents over HTTP with strands_py.http.AgentApp under uvicorn: POST /invocations with an "
            "Idempotency-Key, GET /invocations/{key}/events, and a chat page at /. Without --agent it serves a "
            "scripted demo agent (a real BedrockModel whose boto3 client answers locally): no AWS account needed."
        ),
    )
    serve.add_argument("--agent", metavar="MODULE:FACTORY", help="factory(request) -> strands_py.Agent to serve")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind, 0 for any free one (default 8080)")
    serve.add_argument("--store", default="memory", type=store_from_url, help=STORE_HELP)
    serve.add_argument("--scope", default=None, help="scope of the keys (default: invocations)")
    serve.add_argument(
        "--sessions",
        metavar="DIR",
        default=None,
        help=(
            "serve conversations (/sessions/{id}, the chat page's), kept by strands' FileSessionManager in DIR; "
            "the factory must take session_manager= (default for the demo agent: a temporary directory, removed "
            "at exit; with --agent: no conversations)"
        ),
    )
    serve.add_argument(
        "--busy",
        default=SessionInvocationMode.ENQUEUE.value,
        choices=[mode.value for mode in SessionInvocationMode],
        help="a turn sent while its conversation runs another: enqueue (default: 202, its position) or throw (409)",
    )
    serve.add_argument(
        "--single-tenant",
        action="store_true",
        help=(
            "every caller shares one key scope: anyone who knows a key can read its answer (default with --agent: "
            "keys are scoped per caller, by a digest of the Authorization header; the demo agent is single-tenant)"
        ),
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's and strands_py.http's (info: one line per invocation, without keys or prompts)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="uvicorn's access log too (one line per request; paths of GET /invocations/{key}/events hold keys)",
    )


def store_from_url(url: str) -> IdempotencyStore:
    """The store a ``--store`` URL names.

    Raises:
        argparse.ArgumentTypeError: Not one of the forms in ``STORE_HELP``.
    """
    if url == "memory":
        return InMemoryIdempotencyStore()
    parts = urlsplit(url)
    if parts.scheme == "dynamodb":
        options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - {"region", "endpoint_url"})
        table = parts.netloc + parts.path.rstrip("/")
        if not table or unknown:
            raise argparse.ArgumentTypeError(f"expected dynamodb://TABLE?region=...&endpoint_url=..., got {url!r}")
        from ..idempotency.dynamodb import DynamoDBIdempotencyStore

        return DynamoDBIdempotencyStore(
            table, region_name=options.get("region"), endpoint_url=options.get("endpoint_url")
        )
    if parts.scheme in ("redis", "rediss", "unix"):
        from ..idempotency.redis import RedisIdempotencyStore

        return RedisIdempotencyStore.from_url(url)
    raise argparse.ArgumentTypeError(f"unknown store {url!r}: {STORE_HELP}")


def load_factory(spec: str) -> Callable[[Request], Any]:
    """The agent factory ``module:attribute`` names (as uvicorn finds apps, relative to the working directory).

    A factory may take the request or nothing.

    Raises:
        argparse.ArgumentTypeError: The spec is malformed, cannot be imported, or names an ``Agent`` instance (one
            agent would serve every request: pass a function that builds one).
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise argparse.ArgumentTypeError(f"--agent takes MODULE:FACTORY, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError) as e:
        raise argparse.ArgumentTypeError(f"cannot load {spec!r}: {e}") from e
    if isinstance(target, Agent) or not callable(target):
        raise argparse.ArgumentTypeError(f"{spec!r} must be a function returning a strands_py.Agent (one per request)")
    try:
        takes_request = bool(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        takes_request = True
    if takes_request:
        return target  # type: ignore[no-any-return]
    return lambda request: target()


class _AnnouncingServer(Server):
    """Prints where it listens once it does (the actual port, with ``--port 0``).

    ``at_shutdown`` runs after its shutdown, before uvicorn re-raises the signal that stopped it (a SIGTERM then
    ends the process at once, running no ``finally``).
    """

    def __init__(
        self, config: uvicorn.Config, drain: list[AgentApp], at_shutdown: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config, drain)
        self._at_shutdown = at_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The draining shutdown, then ``at_shutdown``."""
        try:
            await super().shutdown(sockets)
        finally:
            if self._at_shutdown is not None:
                self._at_shutdown()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                url = f"http://{host}:{port}"
                print(f"strands-py: serving on {url}  (page {url}/, API POST {url}/invocations)", flush=True)


def serve(args: argparse.Namespace) -> int:
    """Run ``serve`` until SIGINT or SIGTERM; a draining shutdown. Returns the exit status.

    SIGINT (Ctrl+C) ends with one line on stderr and status 130, not a traceback; SIGTERM ends the process by its
    signal, as uvicorn does, once the shutdown has drained.
    """
    logging.getLogger("strands_py.http").setLevel(args.log_level.upper())
    store: IdempotencyStore = args.store
    directory = args.sessions
    temporary = None
    if directory is None and not args.agent:
        directory = temporary = tempfile.mkdtemp(prefix="strands-py-conversations-")
    sessions = file_sessions(directory) if directory is not None else None
    try:
        if args.agent:
            try:
                app = _app(load_factory(args.agent), store, args, sessions, single_tenant=args.single_tenant)
            except TypeError as e:  # --sessions with a factory that takes no session_manager=
                print(f"strands-py: {e}", file=sys.stderr, flush=True)
                return 2
            if not args.single_tenant:
                print(
                    "strands-py: keys are scoped per caller (a digest of the Authorization header); "
                    "--single-tenant if every caller may read every key's answer",
                    flush=True,
                )
        else:
            # The demo agent serves the same scripted answer to anyone: declared single-tenant, and said so.
            app = _app(demo_agent_factory(), store, args, sessions, single_tenant=True)
            print("strands-py: demo agent, single-tenant: every caller shares one key scope", flush=True)
        if directory is not None:
            kept = "a temporary directory, removed at exit" if temporary is not None else directory
            print(f"strands-py: conversations kept in {kept}", flush=True)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log
        )
        remove = None if temporary is None else functools.partial(shutil.rmtree, temporary, ignore_errors=True)
        _AnnouncingServer(config, [app], remove).run()
    except KeyboardInterrupt:
        # uvicorn drained and shut down first; it re-raises the SIGINT it caught, which Python makes a traceback.
        print("strands-py: stopped (interrupted)", file=sys.stderr, flush=True)
        return 130
    finally:
        close = getattr(store, "close", None)
        if callable(close):
            close()
        if temporary is not None:  # also when the server never started
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


def file_sessions(directory: str) -> SessionManagerFactory:
    """A ``session_manager=`` factory: strands' ``FileSessionManager`` for each conversation, in ``directory``."""
    from strands.session.file_session_manager import FileSessionManager

    def session_manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=directory)

    return session_manager


def _app(
    factory: Callable[..., Any],
    store: IdempotencyStore,
    args: argparse.Namespace,
    sessions: SessionManagerFactory | None,
    **options: Any,
) -> AgentApp:
    config = IdempotencyConfig(store=store, scope=args.scope, session_invocation_mode=args.busy)
    return AgentApp(factory, config, page=True, session_manager=sessions, **options)
