"""Where a sync replay's client time goes: strands-py beside Powertools, under cProfile, per store.

Run by hand: ``hatch run bench:python benchmarks/profile_replay.py [--n 300] [--store dynamodb redis memory]``.
The profiler's clock is the process's CPU time, so a blocking socket read (the wait for the server) counts for
nothing: what remains is the client's own work per replay, split by package (own time of each function, builtins
charged to their caller's package), then the slowest strands-py functions (cumulative). cProfile inflates every
Python call roughly alike; compare the shares and the differences, not the absolute figures with the bench's.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from durable import Impl, dynamodb_impls, memory_impls, redis_impls

STORES: dict[str, Callable[[], AbstractContextManager[list[Impl]]]] = {
    "memory": memory_impls,
    "dynamodb": dynamodb_impls,
    "redis": redis_impls,
}
# Package of a function, by the first marker found in its file name (more specific markers first).
PACKAGES = (
    ("/strands_py/", "strands-py"),
    ("/aws_lambda_powertools/", "powertools"),
    ("/jmespath/", "powertools (jmespath)"),
    ("/strands/", "strands"),
    ("/opentelemetry/", "opentelemetry"),
    ("/botocore/", "botocore"),
    ("/boto3/", "botocore"),
    ("/urllib3/", "http client"),
    ("http/client.py", "http client"),
    ("/redis/", "redis-py"),
    ("/json/", "json"),
    ("/email/", "http client"),
    ("socket.py", "http client"),
)


def _package(filename: str) -> str | None:
    for marker, package in PACKAGES:
        if marker in filename:
            return package
    return None


def by_package(stats: pstats.Stats, calls: int) -> Counter[str]:
    """Own CPU time per call by package; a builtin's time goes to the package of the function that called it."""
    totals: Counter[str] = Counter()
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, tottime, _, callers) in raw.items():
        package = _package(filename)
        if package is None:
            # A builtin ("~") or the standard library: charge it to its callers, in proportion to their calls.
            caller_packages: Counter[str] = Counter()
            for (caller_file, _, _), caller_stats in callers.items():
                caller_packages[_package(caller_file) or "other (stdlib, builtins)"] += caller_stats[0]
            total_calls = sum(caller_packages.values()) or 1
            for caller_package, count in caller_packages.items():
                totals[caller_package] += tottime * count / total_calls
        else:
            totals[package] += tottime
    return Counter({package: seconds / calls for package, seconds in totals.items()})


def profile(impl: Impl, n: int) -> pstats.Stats:
    tokens = [f"profile-{impl.name}-{time.monotonic_ns()}-{i}" for i in range(n)]
    for token in tokens:
        impl.call(token)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for token in tokens:
        impl.call(token)
    profiler.disable()
    return pstats.Stats(profiler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="replays profiled per implementation")
    parser.add_argument("--store", nargs="*", choices=list(STORES), default=list(STORES))
    parser.add_argument("--top", type=int, default=25, help="strands-py functions listed")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for store in args.store:
        with STORES[store]() as impls:
            for impl in impls:
                impl.call("warm-up")
                stats = profile(impl, args.n)
                packages = by_package(stats, args.n)
                total = sum(packages.values())
                print(f"\n## {store} replay, {impl.name}: {total * 1e3:.3f} ms client CPU per call (under cProfile)")
                for package, seconds in packages.most_common():
                    print(f"  {package:<28} {seconds * 1e6:8.1f} µs  {seconds / total:6.1%}")
                if impl.name == "strands-py":
                    print("\n  strands-py functions, cumulative CPU per call:")
                    stats.sort_stats("cumulative")
                    for (filename, line, function), (_, _, _, cumtime, _) in _ordered(stats, args.top):
                        where = f"{filename.split('/strands_py/')[-1]}:{line} {function}"
                        print(f"  {cumtime / args.n * 1e6:8.1f} µs  {where}")
    return 0


def _ordered(
    stats: pstats.Stats, top: int
) -> Iterator[tuple[tuple[str, int, str], tuple[int, int, float, float, dict]]]:
    raw = stats.stats  # type: ignore[attr-defined]
    ours = [(key, value) for key, value in raw.items() if "/strands_py/" in key[0]]
    ours.sort(key=lambda item: item[1][3], reverse=True)
    yield from ours[:top]


if __name__ == "__main__":
    sys.exit(main())
