"""Everything a seed decides: the run's settings, the workload (conversations, turns, keys) and the fault schedule.

Each decision draws from its own ``random.Random`` named after the seed and what it decides (``f"{seed}/faults"``,
``f"{seed}/client/3"``, ...), so that adding a draw to one stream never shifts another, and the fault-free run of a
seed sends exactly the turns its chaos run sends. What depends on timing (which worker is up when a client retries,
how many faults fit in the run) draws from the same streams in the same order, so a seed replays the same decisions
for as long as the run unfolds the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .names import prompt_for

# Fault kinds (also the names in the history and the summary).
KILL_MODEL = "kill_in_model_call"
KILL_TOOL = "kill_in_tool"
PAUSE = "pause_past_lease"
STORE_DELAY = "store_delay"
STORE_DROP = "store_drop"
STORE_REFUSE = "store_refuse"
CLOCK_SKEW = "clock_skew"
DISCONNECT = "client_disconnect"
# Applied by the workers themselves, not the scheduler: a takeover of a session lock sent a while after its holder was
# judged gone (a network slow for that one write), so that other hosts may judge, take over, answer and release the
# same lock meanwhile: the stale read a takeover must survive (it must replace exactly the record it judged).
SLOW_TAKEOVER = "slow_takeover"
SLOW_TAKEOVER_PROBABILITY = 0.25
SCHEDULED = (KILL_MODEL, KILL_TOOL, PAUSE, STORE_DELAY, STORE_DROP, STORE_REFUSE)
_WEIGHTS = (3.0, 3.0, 2.0, 1.5, 1.0, 1.0)

WORK, CLOSING = "work", "closing"
HTTP, DIRECT = "http", "direct"
ENQUEUE, THROW = "enqueue", "throw"

# Turns a minute: ``--minutes`` sizes the workload with it, its turns arrive over that long, and the scheduler injects
# faults for that long (turns still unanswered then are finished without faults). On a 2-core machine under faults,
# about what four workers answer.
TURNS_PER_MINUTE = 30
# A worker's wall clock is off by one of these (seconds; minutes ahead or behind, or a little), never by more than a
# third of the records' expiry: a finished record must outlive every clock's idea of when it expires.
CLOCK_OFFSETS = (0.0, 0.0, 2.5, -2.5, 600.0, -600.0)


@dataclass(frozen=True)
class Settings:
    """One run of one store.

    Attributes:
        seed: Decides the workload, the fault schedule, the clock offsets and the clients' choices.
        store: ``redis`` or ``dynamodb``.
        minutes: How long turns arrive and faults are injected (``TURNS_PER_MINUTE`` turns a minute).
        faults: False for the fault-free run of the same workload (no faults, no clock offsets, no disconnects).
        workers: Worker processes serving at once (killed ones are replaced).
        clients: Clients sending turns at once.
        conversations: Conversations the turns are spread over.
        lease_seconds: The idempotency config's lease (of token claims and session locks).
        wait_timeout_seconds: How long a call waits for another owner (of its key, or of its session) before 409.
        expires_after_seconds: How long a completed result is replayed for.
        turn_deadline_seconds: A client gives a turn up after this long without an answer.
        attempt_timeout_seconds: One request's timeout (a client that does not hear back retries).
        disconnect_probability: Chance that an attempt hangs up early on purpose (and retries).
        fanout_probability: Chance that a turn is sent twice at once, to two workers, with the same key.
        split_scopes: Negative control of the harness and its checker: direct calls are keyed in a scope of their
            own, so an HTTP turn and a direct turn of one conversation take two different session locks and run
            over each other; the checker must see the damage.
    """

    seed: int
    store: str
    minutes: float
    faults: bool = True
    workers: int = 4
    clients: int = 8
    conversations: int = 6
    lease_seconds: float = 2.0
    wait_timeout_seconds: float = 8.0
    expires_after_seconds: float = 3600.0
    turn_deadline_seconds: float = 90.0
    attempt_timeout_seconds: float = 20.0
    disconnect_probability: float = 0.08
    fanout_probability: float = 0.15
    split_scopes: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON."""
        return asdict(self)

    @property
    def turns(self) -> int:
        """Work turns of the workload (closing turns come on top, one per conversation)."""
        return max(self.clients, round(self.minutes * TURNS_PER_MINUTE))


@dataclass(frozen=True)
class Turn:
    """One request of the workload: a prompt for a conversation, sent with one idempotency key until answered.

    Attributes:
        turn: The turn's id (its prompt names it).
        conversation: The session id.
        key: The idempotency key every attempt of this turn carries.
        client: The client that sends it.
        path: ``http`` (``AgentApp``) or ``direct`` (``agent.invoke_async`` in the worker).
        mode: The session invocation mode of the request (``enqueue`` or ``throw``).
        fanout: How many attempt loops send it at once (2: a duplicate to another worker).
        at_seconds: When the client sends it under faults, from the start of its phase (seeded arrival times spread
            the work turns over the run's ``minutes``, so faults land on a busy system all along); a client that is
            behind sends it as soon as its previous turn is answered. The fault-free run sends turns back to back.
        phase: ``work``, or ``closing`` (the fault-free turn every conversation gets at the end).
    """

    turn: str
    conversation: str
    key: str
    client: int
    path: str
    mode: str
    fanout: int = 1
    at_seconds: float = 0.0
    phase: str = WORK

    @property
    def prompt(self) -> str:
        """The turn's prompt."""
        return prompt_for(self.turn)


@dataclass(frozen=True)
class Workload:
    """The conversations and the turns of a run, in each client's order."""

    conversations: tuple[str, ...]
    turns: tuple[Turn, ...]

    def of_phase(self, phase: str) -> list[Turn]:
        """The turns of one phase, in order."""
        return [t for t in self.turns if t.phase == phase]

    def as_dict(self) -> dict[str, Any]:
        """The workload as JSON."""
        return {"conversations": list(self.conversations), "turns": [asdict(t) for t in self.turns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        """A workload read back from ``as_dict``."""
        return cls(tuple(data["conversations"]), tuple(Turn(**t) for t in data["turns"]))


def make_workload(settings: Settings) -> Workload:
    """The workload of ``settings.seed``: the same for the chaos run and the fault-free run."""
    rng = random.Random(f"{settings.seed}/workload")
    conversations = tuple(f"conv-{settings.seed}-{i}" for i in range(settings.conversations))
    # Half the conversations take turns in enqueue mode, half in throw mode (which ones is the seed's).
    modes = {c: (ENQUEUE, THROW)[(i + rng.randrange(2)) % 2] for i, c in enumerate(conversations)}
    window = settings.minutes * 60
    arrivals = sorted(rng.uniform(0.0, window) for _ in range(settings.turns))
    turns = []
    for index, at in enumerate(arrivals):
        conversation = rng.choice(conversations)
        turns.append(
            Turn(
                turn=f"t{index:05d}",
                conversation=conversation,
                key=f"key-{settings.seed}-{index:05d}-{rng.getrandbits(40):010x}",
                client=index % settings.clients,
                path=rng.choice((HTTP, HTTP, DIRECT)),
                mode=modes[conversation],
                fanout=2 if rng.random() < settings.fanout_probability else 1,
                at_seconds=at,
            )
        )
    for index, conversation in enumerate(conversations):
        turns.append(
            Turn(
                turn=f"z{index:03d}",
                conversation=conversation,
                key=f"close-{settings.seed}-{index:03d}-{rng.getrandbits(40):010x}",
                client=index % settings.clients,
                path=HTTP,
                mode=modes[conversation],
                phase=CLOSING,
            )
        )
    return Workload(conversations, tuple(turns))


@dataclass(frozen=True)
class Fault:
    """One scheduled fault.

    Attributes:
        kind: One of ``SCHEDULED``.
        gap_seconds: Calm before it.
        seconds: How long it lasts (pause, delay, refusal).
        delay_ms: The store's added latency (``store_delay``).
        aim_seconds: How long after a model call or tool starts the kill (or stop) lands: inside it, as the script's
            calls last longer than this.
    """

    kind: str
    gap_seconds: float
    seconds: float = 0.0
    delay_ms: float = 0.0
    aim_seconds: float = 0.0


def fault_schedule(settings: Settings) -> Iterator[Fault]:
    """The seed's faults, in order, without end (the run takes as many as fit)."""
    rng = random.Random(f"{settings.seed}/faults")
    lease = settings.lease_seconds
    while True:
        kind = rng.choices(SCHEDULED, _WEIGHTS)[0]
        gap = rng.uniform(0.5, 3.0)
        if kind == PAUSE:
            yield Fault(kind, gap, seconds=lease * rng.uniform(1.3, 2.5), aim_seconds=rng.uniform(0.0, 0.05))
        elif kind == STORE_DELAY:
            yield Fault(kind, gap, seconds=rng.uniform(1.0, 4.0), delay_ms=rng.choice((20.0, 100.0, 400.0, 900.0)))
        elif kind == STORE_REFUSE:
            yield Fault(kind, gap, seconds=rng.uniform(0.3, 2.5))
        elif kind == STORE_DROP:
            yield Fault(kind, gap)
        else:
            yield Fault(kind, gap, aim_seconds=rng.uniform(0.0, 0.05))


def clock_offset(settings: Settings, slot: int, generation: int) -> float:
    """The wall-clock offset of worker ``slot``'s ``generation``-th process (0 in a fault-free run)."""
    if not settings.faults:
        return 0.0
    offset = random.Random(f"{settings.seed}/clock/{slot}/{generation}").choice(CLOCK_OFFSETS)
    limit = settings.expires_after_seconds / 3
    return max(-limit, min(limit, offset))


def respawn_delay(settings: Settings, slot: int, generation: int) -> float:
    """How long a killed worker's slot stays empty before its next process is started."""
    return random.Random(f"{settings.seed}/respawn/{slot}/{generation}").uniform(0.2, 1.5)


@dataclass
class ClientDice:
    """One client's stream of choices: which worker, whether an attempt hangs up early, how long to back off."""

    settings: Settings
    client: int
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.settings.seed}/client/{self.client}")

    def pick(self, choices: list[int]) -> int:
        """One of ``choices`` (worker slots that are up)."""
        return choices[self._rng.randrange(len(choices))]

    def hang_up_after(self) -> float | None:
        """Seconds after which this attempt hangs up on purpose, or None (never in a fault-free run)."""
        roll, seconds = self._rng.random(), self._rng.uniform(0.05, 1.5)
        if self.settings.faults and roll < self.settings.disconnect_probability:
            return seconds
        return None

    def backoff(self, attempt: int) -> float:
        """Pause before retry number ``attempt`` (from 1): jittered, capped."""
        return self._rng.uniform(0.05, min(1.0, 0.1 * 2**attempt))
