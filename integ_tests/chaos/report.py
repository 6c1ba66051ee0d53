"""The summary a chaos run prints: a table of the runs, the faults and the violations by kind, and examples."""

from __future__ import annotations

from collections import Counter, defaultdict

from .checker import Violation
from .run import RunOutcome

EXAMPLES = 3


def _amplification(outcome: RunOutcome) -> str:
    ratios = outcome.report.amplification()
    if ratios is None:
        return "-" if outcome.settings.faults else "1.00 / 1.00 (floor)"
    return f"{ratios[0]:.2f} / {ratios[1]:.2f}"


def _row(outcome: RunOutcome) -> list[str]:
    report = outcome.report
    model, tool = report.work.per_turn()
    return [
        outcome.settings.store,
        "chaos" if outcome.settings.faults else "fault-free",
        str(report.ops),
        f"{report.acked}/{report.turns}",
        str(len(report.unanswered)),
        str(sum(report.faults.values())),
        str(len(report.violations)),
        f"{model:.2f} / {tool:.2f}",
        _amplification(outcome),
        f"{outcome.seconds:.0f} s" if outcome.seconds else "-",
    ]


HEADER = [
    "store",
    "run",
    "ops",
    "acked turns",
    "unanswered",
    "faults",
    "violations",
    "model calls / tool runs per turn",
    "amplification (model / tool)",
    "time",
]


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def _name(outcome: RunOutcome) -> str:
    return f"{outcome.settings.store} {'chaos' if outcome.settings.faults else 'fault-free'}"


def _by_kind(outcomes: list[RunOutcome], counts: list[Counter[str]], what: str) -> str:
    kinds = sorted({kind for count in counts for kind in count})
    if not kinds:
        return f"{what}: none"
    rows = [[what, *(_name(o) for o in outcomes)], *([k, *(str(c[k]) for c in counts)] for k in kinds)]
    return _markdown(rows)


def table(outcomes: list[RunOutcome]) -> str:
    """Markdown tables of the runs: the figures, the faults injected by kind, the violations by kind."""
    return "\n\n".join(
        [
            _markdown([HEADER, *(_row(o) for o in outcomes)]),
            _by_kind(outcomes, [o.report.faults for o in outcomes], "faults injected"),
            _by_kind(outcomes, [o.report.by_kind() for o in outcomes], "violations"),
        ]
    )


def _examples(violations: list[Violation]) -> list[str]:
    by_kind: dict[str, list[Violation]] = defaultdict(list)
    for violation in violations:
        by_kind[violation.kind].append(violation)
    lines = []
    for kind, found in sorted(by_kind.items()):
        lines.append(f"    {kind}: {len(found)}")
        for v in found[:EXAMPLES]:
            lines.append(f"      - {v.conversation or '-'} {v.turn or '-'}: {v.detail}")
    return lines


def details(outcome: RunOutcome) -> str:
    """Faults, outcomes of the attempts, violations with examples, and the harness's troubles of one run."""
    report = outcome.report
    lines = [f"{_name(outcome)} (history: {outcome.directory})"]
    if report.faults:
        lines.append("  faults: " + ", ".join(f"{k} {n}" for k, n in sorted(report.faults.items())))
    lines.append("  attempts: " + ", ".join(f"{k} {n}" for k, n in sorted(report.outcomes.items())))
    if report.uncertain_tool_reruns:
        lines.append(f"  tool runs repeated after a run that never completed: {report.uncertain_tool_reruns}")
    asked, found = report.reconciled
    if asked:
        lines.append(f"  tool calls that died mid-run, reconciled: {asked} ({found} had completed)")
    if not report.checked_final_state:
        lines.append("  the run ended before its final state was read: conversations and locks were not checked")
    if report.violations:
        lines.append("  violations:")
        lines.extend(_examples(report.violations))
    else:
        lines.append("  violations: none")
    for trouble in outcome.troubles:
        lines.append(f"  harness trouble: {trouble}")
    return "\n".join(lines)
