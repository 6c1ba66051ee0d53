"""``python -m strands_py``: ``demo`` (a retry storm, the old blocking waiter against strands-py) and ``serve``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from ..agent.agent import Agent
from .storm import BlockingWaiterAgent, StormReport, run_storm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m strands_py", description="strands-py command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="retry storm against a stubbed BedrockModel: the old blocking waiter vs strands-py",
        description=(
            "One primary invocation (a two-cycle tool-use conversation with a real BedrockModel whose boto3 client "
            "is a local stub) and N duplicates of its idempotency token, on one event loop whose default executor "
            "is capped at a few workers. No AWS account, no network."
        ),
    )
    demo.add_argument("--duplicates", type=_positive_int, default=200, help="duplicates of the token (default 200)")
    demo.add_argument("--workers", type=_positive_int, default=4, help="default executor max_workers (default 4)")
    demo.add_argument(
        "--timeout", type=float, default=5.0, help="seconds after which a storm counts as hung (default 5)"
    )
    try:
        from ..http import _cli as http_cli
    except ImportError:  # without the http extra there is no serve command
        commands.add_parser("serve", help="serve an agent over HTTP (needs: pip install 'strands-py[http]')")
    else:
        http_cli.add_parser(commands)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _table(reports: Sequence[StormReport]) -> str:
    header = ("implementation", "outcome", "wall time", "model calls", "tool calls", "threads held by waiters")
    rows = [
        (
            r.impl,
            "finished" if r.completed else "HUNG",
            f"{r.seconds:.3f} s" if r.completed else f">{r.seconds:.1f} s (timeout)",
            str(r.model_calls),
            str(r.tool_calls),
            str(r.threads_parked),
        )
        for r in reports
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _demo(duplicates: int, workers: int, timeout: float) -> int:
    def progress(impl: str) -> Callable[[str], None]:
        started = time.perf_counter()
        return lambda line: print(f"  [{impl} +{time.perf_counter() - started:6.3f}s] {line}", flush=True)

    print(
        f"retry storm: 1 primary + {duplicates} duplicates of one idempotency token, "
        f"default executor capped at {workers} workers, hang timeout {timeout:.1f}s",
        flush=True,
    )
    reports = []
    for impl, cls in (("blocking-waiter (control)", BlockingWaiterAgent), ("strands-py", Agent)):
        print(f"{impl}:", flush=True)
        reports.append(run_storm(cls, duplicates, workers=workers, timeout=timeout, progress=progress(impl)))
    print()
    print(_table(reports))
    ours = reports[-1]
    ok = ours.completed and ours.model_calls == 2 and ours.tool_calls == 1 and ours.errors == 0
    print()
    if ok:
        print(f"strands-py: one primary (2 model calls, 1 tool call), {ours.equal_results} equal results, exit 0")
    else:
        print("strands-py did NOT finish with exactly one primary: exit 1")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit status.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "serve":
        try:
            from ..http import _cli as http_cli
        except ImportError as e:
            parser.error(f"serve needs the http extra (pip install 'strands-py[http]'): {e}")
        return http_cli.serve(args)
    try:
        return _demo(args.duplicates, args.workers, args.timeout)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
