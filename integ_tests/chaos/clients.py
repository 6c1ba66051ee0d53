"""The clients: each sends its turns in order, each when it is due, every attempt of a turn with the turn's
idempotency key, to any worker that is up, over HTTP (``AgentApp``) or as a direct call, until it gets an answer or
the turn's deadline passes.

A client retries on anything but an answer: a refused or reset connection (the worker was killed), a timeout (the
worker is stopped, or the attempt hung up on purpose), 409 (the session is busy, the key runs elsewhere, a lease was
lost), 5xx. A turn sent with ``fanout=2`` is sent by two attempt loops at once (usually to two workers), each until it
gets an answer: both answers are recorded. Every attempt is written to ``clients.jsonl`` when it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import httpx

from .cluster import Cluster, WorkerProcess
from .history import JsonLines
from .names import CONVERSATION_HEADER
from .workload import DIRECT, ClientDice, Settings, Turn

OK, HUNG_UP = "ok", "hung_up"
# 4xx answers other than these mean the request itself is wrong: retrying the same request cannot help.
RETRIED_4XX = (408, 409, 425, 429)


class Clients:
    """Sends turns and records every attempt. Use from the orchestrator's event loop."""

    def __init__(self, settings: Settings, cluster: Cluster, attempts: JsonLines, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self._cluster = cluster
        self._attempts = attempts
        self._http = http
        self._dice: dict[int, ClientDice] = {}

    async def run(self, turns: list[Turn], *, paced: bool) -> None:
        """Send ``turns``: each client's in order, the clients at once; ``paced``: each turn when it is due
        (``at_seconds`` from now), else as soon as the client's previous turn is answered."""
        by_client: dict[int, list[Turn]] = defaultdict(list)
        for turn in turns:
            by_client[turn.client].append(turn)
        start = time.monotonic() if paced else None
        await asyncio.gather(*(self._client(client, mine, start) for client, mine in sorted(by_client.items())))

    def _dice_of(self, client: int) -> ClientDice:
        if client not in self._dice:
            self._dice[client] = ClientDice(self.settings, client)
        return self._dice[client]

    async def _client(self, client: int, turns: list[Turn], start: float | None) -> None:
        dice = self._dice_of(client)
        for turn in turns:
            if start is not None:
                # The turn's seeded arrival time (at once if the client is behind): the workload, not a synchronisation.
                await asyncio.sleep(max(0.0, start + turn.at_seconds - time.monotonic()))
            deadline = time.monotonic() + self.settings.turn_deadline_seconds
            await asyncio.gather(*(self._until_answered(turn, dice, deadline) for _ in range(turn.fanout)))

    async def _until_answered(self, turn: Turn, dice: ClientDice, deadline: float) -> None:
        attempt = 0
        while time.monotonic() < deadline:
            workers = self._cluster.up()
            if not workers:
                await self._cluster.changed(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            slot = dice.pick(sorted(w.slot for w in workers))
            worker = next(w for w in workers if w.slot == slot)
            outcome = await self._attempt(turn, worker, dice.hang_up_after(), deadline)
            if outcome in (OK, "refused"):
                return
            attempt += 1
            pause = min(dice.backoff(attempt), max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)  # the client's seeded backoff before it retries

    async def _attempt(self, turn: Turn, worker: WorkerProcess, hang_up: float | None, deadline: float) -> str:
        timeout = self.settings.attempt_timeout_seconds if hang_up is None else hang_up
        timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        start = time.monotonic()
        outcome, text, detail = await self._send(turn, worker, timeout, hang_up is not None)
        self._attempts.write(
            {
                "ev": "attempt",
                "client": turn.client,
                "turn": turn.turn,
                "conversation": turn.conversation,
                "key": turn.key,
                "prompt": turn.prompt,
                "phase": turn.phase,
                "path": turn.path,
                "slot": worker.slot,
                "pid": worker.pid,
                "start": start,
                "end": time.monotonic(),
                "outcome": outcome,
                "text": text,
                "detail": detail,
            }
        )
        return outcome

    async def _send(
        self, turn: Turn, worker: WorkerProcess, timeout: float, hanging_up: bool
    ) -> tuple[str, str | None, str | None]:
        """One request; (outcome, answer text, detail)."""
        base = f"http://127.0.0.1:{worker.port}"
        request: dict[str, Any]
        if turn.path == DIRECT:
            body = {"conversation": turn.conversation, "mode": turn.mode, "prompt": turn.prompt, "key": turn.key}
            request = {"url": f"{base}/direct", "json": body}
        else:
            headers = {"Idempotency-Key": turn.key, CONVERSATION_HEADER: turn.conversation}
            request = {"url": f"{base}/{turn.mode}/invocations", "json": {"prompt": turn.prompt}, "headers": headers}
        try:
            response = await self._http.post(**request, timeout=timeout)
        except httpx.TimeoutException as e:
            return (HUNG_UP if hanging_up else f"error:{type(e).__name__}"), None, None
        except httpx.HTTPError as e:
            return f"error:{type(e).__name__}", None, None
        if response.status_code == 200:
            return OK, str(response.json().get("text", "")).strip(), None
        detail = _problem(response)
        if 400 <= response.status_code < 500 and response.status_code not in RETRIED_4XX:
            return "refused", None, f"{response.status_code} {detail}"
        return f"status:{response.status_code}", None, detail


def _problem(response: httpx.Response) -> str | None:
    """What a failed response says went wrong (the problem type, or the direct call's error), if it says."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    found = body.get("type") or body.get("error")
    return str(found).rsplit("/", 1)[-1] if found else None
