"""The history of a run: JSON lines written as things happen, read back whole by the checker.

A run's directory holds:

- ``settings.json`` and ``workload.json``: what the seed decided (``workload.Settings``, ``workload.Workload``);
- ``meta.json``: what was tested (Python, strands-agents, the library's commit and uncommitted files) and where the
  copy of the library it ran on is (``library/`` beside the runs' directories: workers and the moto server import
  that copy, taken once for the fault-free and the chaos runs);
- ``clients.jsonl``: one ``attempt`` record per request a client sent (``client``, ``turn``, ``conversation``,
  ``key``, ``prompt``, ``path``, ``slot``, ``pid``, ``start``/``end`` on the monotonic clock, ``outcome``: ``ok``,
  ``status:NNN``, ``refused``, ``hung_up`` or ``error:<ExceptionName>``, ``text``: the answer when ``ok``);
- ``events/worker-<slot>-<generation>.jsonl``: per worker process, ``ready``, then ``model`` (``phase`` ``start`` or
  ``end``) and ``tool`` (``phase`` ``start`` or ``done``, with the tool call's idempotency ``key``) records, each
  with ``pid``, ``turn``, ``step`` and ``mono``; model and tool records are fsync'ed before the call goes on, so a
  SIGKILL cannot hide a call that started; ``reconcile`` records when the library asked whether a tool call that died
  mid-run had completed (``found``);
- ``faults.jsonl``: one ``fault`` record per fault applied (``kind``, ``pid`` or ``slot``, parameters, ``mono``),
  ``missed`` for an aimed fault that found no target in time, ``healed`` when the faults stopped;
- ``phases.jsonl``: when the orchestrator's phases ended (``begun``, ``started``, ``worked``, ``closed``, ...);
- ``sessions/``: the conversations (strands' ``FileSessionManager`` directory, shared by every worker);
- ``logs/``: each worker process's log (the library's INFO log, tracebacks, stack dumps) and the store server's;
- ``final.json``: the state after every process is gone: each conversation's persisted messages, and each
  conversation's session lock record as the store's ``get`` returns it (``state`` and ``owner``, or null).

Times are ``time.monotonic()`` values: one clock for every process of the machine (a worker's skewed wall clock does
not touch it), so records of different processes can be ordered.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workload import Settings, Workload

SETTINGS = "settings.json"
WORKLOAD = "workload.json"
CLIENTS = "clients.jsonl"
FAULTS = "faults.jsonl"
FINAL = "final.json"
META = "meta.json"
LIBRARY = "library"
PHASES = "phases.jsonl"
EVENTS = "events"
SESSIONS = "sessions"


class JsonLines:
    """An append-only file of JSON records, one a line. Thread-safe.

    ``durable``: every record is fsync'ed before ``write`` returns (a record of a call that started survives a
    SIGKILL of the process right after).
    """

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._durable = durable
        self._file = path.open("a", encoding="utf-8")
        self._mutex = threading.Lock()

    def write(self, record: dict[str, Any]) -> str:
        """Append ``record``; returns its line (without the newline)."""
        line = json.dumps(record, separators=(",", ":"), sort_keys=True)
        with self._mutex:
            self._file.write(line + "\n")
            self._file.flush()
            if self._durable:
                os.fsync(self._file.fileno())
        return line

    def close(self) -> None:
        """Close the file."""
        with self._mutex:
            self._file.close()


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (its writer killed mid-write) is skipped."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON."""
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str), encoding="utf-8")


@dataclass
class FinalState:
    """What is left after every process is gone.

    Attributes:
        conversations: Each conversation's persisted messages, in order (Bedrock message dicts).
        locks: Each conversation's session lock record as ``{"state": ..., "owner": ...}``, or None when absent.
    """

    conversations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    locks: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The state as JSON."""
        return {"conversations": self.conversations, "locks": self.locks}


@dataclass
class History:
    """A run's records, as the checker reads them.

    Attributes:
        settings: The run's settings.
        workload: The turns the clients were given.
        attempts: Every request a client sent (``clients.jsonl``), in the order written.
        calls: Every model, tool, reconcile and fault record of every worker process.
        faults: Every fault applied.
        final: The state after the run (None when the run did not get that far: nothing about it is checked).
    """

    settings: Settings
    workload: Workload
    attempts: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    final: FinalState | None = None


def load_history(directory: Path) -> History:
    """Read a run's directory (see the module docstring)."""
    settings = Settings(**json.loads((directory / SETTINGS).read_text(encoding="utf-8")))
    workload = Workload.from_dict(json.loads((directory / WORKLOAD).read_text(encoding="utf-8")))
    calls: list[dict[str, Any]] = []
    for path in sorted((directory / EVENTS).glob("*.jsonl")):
        calls.extend(r for r in read_lines(path) if r.get("ev") in ("model", "tool", "reconcile", "fault"))
    final_path = directory / FINAL
    final = FinalState(**json.loads(final_path.read_text(encoding="utf-8"))) if final_path.exists() else None
    return History(
        settings=settings,
        workload=workload,
        attempts=[r for r in read_lines(directory / CLIENTS) if r.get("ev") == "attempt"],
        calls=calls,
        faults=[r for r in read_lines(directory / FAULTS) if r.get("ev") == "fault"],
        final=final,
    )
