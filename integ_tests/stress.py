"""``hatch run stress``: every test that races threads or processes, 200 times each, beside two CPU burners.

A test that can fail by timing is a defect; this is how we look for one. Tests marked ``racing`` run ``--count``
times each (pytest-repeat) in one pytest session while two processes spin on the two cores, then the pass counts
per test are printed. A full run then runs the long chaos run (``hatch run chaos``, 30 minutes of faults per store, a
random seed, printed): ``prepare`` runs only a short one. Exit status 1 if any repetition failed or the chaos run
found anything.

    hatch run stress                       # every racing test, 200 times, then 30 minutes of chaos per store
    hatch run stress --count 20 -k redis   # a subset, fewer times (anything after the options goes to pytest)
    hatch run stress --path tests          # only the racing tests under tests/ (repeatable)
    hatch run stress --chaos-minutes 5     # a shorter chaos run (0: none; a subset runs none unless asked)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Sequence

# pytest-repeat appends "[i-n]" to a test's id, or "-i-n" inside its existing parameters
_REPEAT_SUFFIX = re.compile(r"(\[\d+-\d+\]|-\d+-\d+(\]))$")


def _burn() -> None:  # pragma: no cover - runs in the burner processes
    while True:
        pass


def _test_id(case: ElementTree.Element) -> str:
    name = _REPEAT_SUFFIX.sub(lambda m: m.group(2) or "", case.get("name", "?"))
    return f"{case.get('classname', '?')}::{name}"


def _counts(junit: str) -> tuple[Counter[str], Counter[str]]:
    passed: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for case in ElementTree.parse(junit).iter("testcase"):
        test = _test_id(case)
        outcome = {child.tag for child in case}
        if outcome & {"failure", "error"}:
            failed[test] += 1
        elif "skipped" in outcome:
            # xfail negative controls report as skipped: they behaved as expected
            passed[test] += 1
        else:
            passed[test] += 1
    return passed, failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the racing tests under load and print the pass counts."""
    parser = argparse.ArgumentParser(prog="hatch run stress", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="repetitions of each racing test (default 200)")
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning processes beside the tests (default 2)")
    parser.add_argument(
        "--path", action="append", dest="paths", help="where to collect racing tests (default: tests, integ_tests)"
    )
    parser.add_argument(
        "--chaos-minutes",
        type=float,
        default=None,
        help="minutes of chaos per store after the tests (default: 30 for a full run, none for a subset)",
    )
    args, pytest_args = parser.parse_known_args(argv)
    chaos_minutes = args.chaos_minutes
    if chaos_minutes is None:
        chaos_minutes = 0.0 if args.paths or pytest_args else 30.0
    burners = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        junit = os.path.join(scratch, "stress.xml")
        command = [
            sys.executable,
            "-m",
            "pytest",
            *(args.paths or ["tests", "integ_tests"]),
            "-m",
            "racing",
            "-p",
            "no:cacheprovider",
            f"--count={args.count}",
            "--repeat-scope=module",
            "-q",
            f"--junitxml={junit}",
            *pytest_args,
        ]
        # The thread-interleaving state machine: fewer random examples per repetition (see its profiles).
        env = {**os.environ, "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "stress")}
        try:
            code = subprocess.call(command, env=env)
        finally:
            for burner in burners:
                burner.kill()
                burner.join()
        if not os.path.exists(junit):
            print(f"pytest produced no report (exit {code})")
            return 1
        passed, failed = _counts(junit)
    minutes = (time.monotonic() - started) / 60
    print(f"\nstress: {args.count} repetitions per racing test, {args.burners} CPU burners, {minutes:.1f} min")
    width = max((len(t) for t in passed | failed), default=10)
    for test in sorted(passed | failed):
        total = passed[test] + failed[test]
        print(f"  {test.ljust(width)}  {passed[test]}/{total}")
    tests_passed = code == 0 and not failed
    if chaos_minutes <= 0:
        return 0 if tests_passed else 1
    # After the burners: the chaos run's workers are the load, and its faults the stress.
    chaos = [sys.executable, "-m", "integ_tests.chaos", "--minutes", f"{chaos_minutes:g}", "--store", "both"]
    print(f"\nstress: the chaos run, {chaos_minutes:g} min per store", flush=True)
    chaos_code = subprocess.call(chaos)
    return 0 if tests_passed and chaos_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
