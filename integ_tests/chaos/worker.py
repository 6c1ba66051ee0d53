"""Entry point of a worker process, forked by multiprocessing's fork server with the heavy modules imported.

Importing strands, boto3, uvicorn and redis-py takes seconds of CPU; on two cores, four workers starting at once took
ten. The cluster therefore starts its workers from a fork server that imported those once (``multiprocessing``
``forkserver`` context, ``set_forkserver_preload``): a worker, or the replacement of a killed one, is up in about
half a second. Each is still an OS process of its own (its own pid, signals, memory).

The library itself (``strands_py``) and this package's worker modules are imported in the worker, after the fork,
from the copy of the library the run took when it began (the working tree may change during a run): whatever the
library draws once at import (its record versions are a random per-process prefix and a counter) must be the
process's own, as it is in processes started from scratch. (Forked after the library was imported, every
worker would start with the same version prefix and counter: two processes then write equal versions, and a waiter
that watches versions can take a live lock over; see the chaos run's report.)

The process's wall clock is skewed first, by the offset the cluster gives it (seconds; positive runs ahead), before
any agent or store exists: whatever reads ``time.time()`` in this process (the library, botocore, redis-py all look
the function up on the ``time`` module at each call) sees the skewed clock, as on a host whose clock is off.
``time.monotonic()`` is untouched (it is what the history orders records by).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def skew_clock(offset: float) -> None:
    """Make ``time.time()`` and ``time.time_ns()`` of this process run ``offset`` seconds ahead (behind if < 0)."""
    if not offset:
        return
    real, real_ns = time.time, time.time_ns
    nanoseconds = int(offset * 1e9)
    time.time = lambda: real() + offset
    time.time_ns = lambda: real_ns() + nanoseconds


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the fork server) exits (Linux; elsewhere nothing).

    The fork server exits when the orchestrator does, however it ends: a worker never outlives its run.
    """
    libc_name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or libc_name is None:
        return
    parent = os.getppid()
    ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent was already gone before the request took effect
        os._exit(1)


def _output_to(log: str) -> None:
    """Send this process's stdout and stderr (faulthandler's stack dumps included) to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _import_library(library: str) -> str:
    """Import the library from the run's snapshot (see ``run.snapshot_library``); returns where it was found.

    Raises:
        RuntimeError: The library was imported from elsewhere already (this process would test other code).
    """
    sys.path.insert(0, library)
    import strands_py

    found = os.path.realpath(strands_py.__file__)
    if not found.startswith(os.path.realpath(library) + os.sep):
        raise RuntimeError(f"strands_py was imported from {found}, not from the run's snapshot {library}")
    return found


def worker_main(
    config: str, library: str, slot: int, generation: int, offset: float, log: str, ready: Connection
) -> None:
    """Skew the clock, import the library from ``library``, then serve until SIGTERM (see ``server.serve``); the port
    is sent on ``ready``."""
    _die_with_parent()
    _output_to(log)
    skew_clock(offset)
    _import_library(library)
    from .server import WorkerConfig, serve

    serve(WorkerConfig.load(config), slot, generation, offset, ready.send)
