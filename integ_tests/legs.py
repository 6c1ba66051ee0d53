"""The two compat legs of ``hatch run prepare`` at once: (Python 3.10, strands-agents 1.30.0) and (3.13, newest).

Most of the suite waits (for servers, processes, leases), so the legs share the machine's cores well: run one after
the other they took about 42 minutes, side by side 22 (1307 s). Each leg's lines are printed as they come, prefixed
with the leg's name; the exit status is non-zero when either leg failed. Coverage data files are per process
(``parallel = true``), so ``coverage combine`` afterwards sees both legs.

The environments are created first, one at a time (two installers writing hatch's state at once are not safe).
Extra arguments go to both legs' pytest.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import IO

LEGS = ("compat.py3.10-oldest", "compat.py3.13-newest")


def _relay(name: str, stream: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def main(args: list[str]) -> int:
    """Create both environments, run both legs at once, report each leg's status and duration."""
    for leg in LEGS:
        subprocess.run(["hatch", "env", "create", leg], check=True)
    lock = threading.Lock()
    started = time.monotonic()
    running = []
    for leg in LEGS:
        process = subprocess.Popen(
            ["hatch", "run", f"{leg}:test", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        relay = threading.Thread(target=_relay, args=(leg, process.stdout, lock), daemon=True)
        relay.start()
        running.append((leg, process, relay))
    failed = []
    for leg, process, relay in running:
        code = process.wait()
        relay.join()
        print(f"[{leg}] exit status {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(leg)
    if failed:
        print(f"failed legs: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
