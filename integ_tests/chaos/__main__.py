"""``hatch run chaos [--seed N] [--minutes M] [--store redis|dynamodb|both]``: the chaos run (see the package
docstring). Exit status 1 when any run found a violation (or the harness had trouble); the history is then kept and
its path printed, so that the run can be studied, checked again (``--check DIR``) and its seed run again.

    hatch run chaos                          # a random seed, 2 minutes per store, both stores
    hatch run chaos --seed 7 --minutes 30    # the long run
    hatch run chaos --seed 7 --store redis --keep
    hatch run chaos --check /tmp/strands-py-chaos-xyz/redis-chaos
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# As ``stores.STORES``. This module imports nothing of the run at import time: a worker process imports the parent's
# main module again when it starts, and must import the library itself, from the run's snapshot (see ``worker``).
STORES = ("redis", "dynamodb")


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hatch run chaos",
        description="Seeded faults over worker processes, conversations and keys, then a checker over the history.",
        epilog="\n".join(line.strip() for line in __doc__.splitlines() if line.startswith("    hatch run")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=None, help="decides workload and faults (default: random)")
    parser.add_argument(
        "--minutes", type=float, default=2.0, help="per store: turns arrive and faults land this long (default 2)"
    )
    parser.add_argument("--store", choices=[*STORES, "both"], default="both")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--clients", type=int, default=8, help="clients sending at once (default 8)")
    parser.add_argument("--conversations", type=int, default=6, help="conversations (default 6)")
    parser.add_argument("--lease", type=float, default=2.0, help="lease_seconds of the agents (default 2)")
    parser.add_argument(
        "--expires-after",
        type=float,
        default=3600.0,
        help="expires_after_seconds of the agents (default 3600): a few seconds lets records expire during the run",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free run (no amplification)")
    parser.add_argument("--keep", action="store_true", help="keep the history even when nothing was found")
    parser.add_argument("--out", type=Path, default=None, help="where to write the history (default: a temp dir)")
    parser.add_argument("--check", type=Path, default=None, help="only check the history in this directory")
    parser.add_argument("--baseline-dir", type=Path, default=None, help="with --check: the fault-free history")
    return parser.parse_args(argv)


def _recheck(directory: Path, baseline: Path | None) -> int:
    from .checker import check, work_of
    from .history import load_history
    from .report import details, table
    from .run import RunOutcome

    history = load_history(directory)
    base = work_of(load_history(baseline)) if baseline is not None else None
    outcome = RunOutcome(history.settings, directory, check(history, base), 0.0, [])
    print(table([outcome]))
    print(details(outcome))
    return 1 if outcome.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos run (or check a kept history); print the summary; 1 if anything was found."""
    args = _arguments(argv)
    if args.check is not None:
        return _recheck(args.check, args.baseline_dir)
    # A terminated run (kill, a CI timeout) unwinds like an interrupted one: the workers, the store server and the
    # proxies it started are stopped by the same finally blocks, instead of being left running.
    signal.signal(signal.SIGTERM, _terminated)
    return _run(args)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _settings(args: argparse.Namespace, seed: int, store: str) -> Any:
    from .workload import Settings

    return Settings(
        seed=seed,
        store=store,
        minutes=args.minutes,
        workers=args.workers,
        clients=args.clients,
        conversations=args.conversations,
        lease_seconds=args.lease,
        expires_after_seconds=args.expires_after,
    )


def _run(args: argparse.Namespace) -> int:
    from .report import details, table
    from .run import RunOutcome, run_store, snapshot_library

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    root = args.out or Path(tempfile.mkdtemp(prefix=f"strands-py-chaos-{seed}-"))
    root.mkdir(parents=True, exist_ok=True)
    stores = STORES if args.store == "both" else (args.store,)
    library = snapshot_library(root)
    tested = json.loads((library / "provenance.json").read_text())
    version = f"{tested['commit']}{' + uncommitted changes' if tested['uncommitted'] else ''}"
    print(f"chaos run: seed {seed}, {args.minutes:g} min per store, {args.workers} workers, library {version}")
    print(f"history: {root}")
    outcomes: list[RunOutcome] = []
    try:
        for store in stores:
            for outcome in run_store(
                _settings(args, seed, store), root, baseline=not args.no_baseline, library=library
            ):
                outcomes.append(outcome)
                print(details(outcome), flush=True)
    finally:
        failed = not outcomes or any(o.failed for o in outcomes) or {o.settings.store for o in outcomes} != set(stores)
        if outcomes:
            print()
            print(table(outcomes))
        if failed or args.keep:
            print(f"\nhistory kept: {root}  (seed {seed}: hatch run chaos --seed {seed} --minutes {args.minutes:g})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
