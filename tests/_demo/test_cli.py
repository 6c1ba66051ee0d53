from __future__ import annotations

from unittest import mock

import pytest

from strands_py._demo import cli
from strands_py._demo.storm import StormReport


def test_demo_prints_table_with_control_hung_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["demo", "--duplicates", "16", "--timeout", "1"])
    out = capsys.readouterr().out
    assert status == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "implementation"
    control, ours = (row.split("|")[1:-1] for row in table[1:])
    assert control[0].strip() == "blocking-waiter" and control[1].strip() == "HUNG"
    assert ours[0].strip() == "strands-py" and ours[1].strip() == "finished"
    assert [c.strip() for c in ours[3:]] == ["2", "1", "0"]
    assert "calls finished" in out  # progress was shown while running


def test_demo_exits_one_when_strands_py_does_not_finish_with_one_primary(capsys: pytest.CaptureFixture[str]) -> None:
    hung = StormReport("strands-py", 4, False, 1.0, 1, 0, 0, 0, 0, 4)
    with mock.patch.object(cli, "run_storm", return_value=hung):
        assert cli.main(["demo", "--duplicates", "4"]) == 1
    assert "did NOT finish" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--duplicates", "0"], ["demo", "--workers", "x"], []])
def test_bad_arguments_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
