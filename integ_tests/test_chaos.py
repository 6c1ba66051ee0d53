"""A short chaos run of a fixed seed on each store (``integ_tests/chaos``): the fault-free run of the seed's workload,
then its run under faults, both judged by the history checker. Every kind of violation the checker knows is a
promise of the library (see ``chaos.checker``): none may appear, with faults or without. ``hatch run chaos`` runs the
same thing longer, with any seed.

On failure the test prints the summary and the violations with examples; the history stays in pytest's ``tmp_path``
(the last runs are kept), and ``hatch run chaos --seed <SEED> --store <store> --minutes <MINUTES>`` runs it again.

The negative control runs the harness with a defect of its own that breaks the session lock's promise for real:
direct calls keyed in another scope than HTTP requests, so turns of one conversation take two different locks and
run over each other. The whole pipeline (records, final state, checker) must see the damage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _servers import redis_server_binary
from chaos import checker
from chaos.report import details, table
from chaos.run import judged_run, run_store, snapshot_library
from chaos.stores import REDIS, STORES
from chaos.workload import SCHEDULED, Settings

CHAOS = pytest.mark.chaos

SEED = 20251207
MINUTES = 0.4
# A little longer than the chaos run's default: on a loaded two-core machine, moto answers slowly enough that a 2 s
# lease is sometimes lost without any fault (that costs time, and is no violation).
LEASE_SECONDS = 3.0
TURN_DEADLINE = 45.0


@CHAOS
@pytest.mark.timeout(480)  # about two minutes; a library that answers nothing makes every turn wait its deadline
@pytest.mark.parametrize("store", STORES)
def test_a_short_chaos_run_breaks_no_promise(store: str, tmp_path: Path) -> None:
    if store == REDIS:
        redis_server_binary()  # skips (fails on CI) without redis-server
    settings = Settings(
        seed=SEED, store=store, minutes=MINUTES, lease_seconds=LEASE_SECONDS, turn_deadline_seconds=TURN_DEADLINE
    )

    fault_free, chaos = run_store(settings, tmp_path)

    print(f"\n{table([fault_free, chaos])}\n{details(fault_free)}\n{details(chaos)}")
    assert not fault_free.troubles and not chaos.troubles, "the harness itself had trouble"
    assert fault_free.report.violations == [], details(fault_free)
    assert chaos.report.violations == [], details(chaos)
    # The run was a chaos run: faults of several kinds landed, and every turn (closing turns included) was answered.
    assert len(set(chaos.report.faults) & set(SCHEDULED)) >= 3, chaos.report.faults
    assert chaos.report.unanswered == []


@CHAOS
@pytest.mark.timeout(120)
def test_negative_control_turns_of_one_conversation_under_two_locks_are_caught(tmp_path: Path) -> None:
    redis_server_binary()
    # Sixteen turns arrive within three seconds on two conversations, a third of them as direct calls.
    settings = Settings(
        seed=SEED, store=REDIS, minutes=0.05, faults=False, clients=16, conversations=2, split_scopes=True
    )

    outcome = judged_run(settings, tmp_path / "split-scopes", snapshot_library(tmp_path))

    print(f"\n{table([outcome])}\n{details(outcome)}")
    assert not outcome.troubles
    found = set(outcome.report.by_kind())
    assert found & {checker.ACKED_MISSING, checker.STALE_CONVERSATION, checker.MALFORMED_TURN}, details(outcome)
