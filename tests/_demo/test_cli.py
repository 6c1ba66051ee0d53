from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from strands_py import Agent
from strands_py._demo import cli
from strands_py._demo.storm import StormReport
from strands_py.http import AgentApp
from strands_py.http import _cli as http_cli
from strands_py.idempotency import DynamoDBIdempotencyStore, InMemoryIdempotencyStore
from strands_py.testing import ScriptedBedrock


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


# -- serve ----------------------------------------------------------------------------------------------------------

SCRIPT = ScriptedBedrock()


def make_agent() -> Agent:
    return Agent(model=SCRIPT.model(), tools=SCRIPT.tools(), callback_handler=None)


def make_agent_for(request: object) -> Agent:
    return make_agent()


SHARED = Agent(callback_handler=None)


def test_serve_store_urls() -> None:
    assert isinstance(http_cli.store_from_url("memory"), InMemoryIdempotencyStore)
    dynamodb = http_cli.store_from_url("dynamodb://agent-table?region=eu-west-1&endpoint_url=http://127.0.0.1:1")
    assert isinstance(dynamodb, DynamoDBIdempotencyStore) and dynamodb.table_name == "agent-table"
    dynamodb.close()
    redis = http_cli.store_from_url("redis://127.0.0.1:1/0")
    assert type(redis).__name__ == "RedisIdempotencyStore"
    redis.close()  # type: ignore[attr-defined]
    for bad in ["dynamodb://", "dynamodb://t?region=x&color=blue", "postgres://db", "memory:"]:
        with pytest.raises(argparse.ArgumentTypeError):
            http_cli.store_from_url(bad)


def test_serve_agent_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != os.getcwd()])
    wrapped = http_cli.load_factory(f"{__name__}:make_agent")
    assert isinstance(wrapped(object()), Agent)  # a factory without parameters is called without the request
    assert http_cli.load_factory(f"{__name__}:make_agent_for") is make_agent_for
    assert http_cli.load_factory("builtins:dict") is dict  # no signature to inspect: called with the request
    assert sys.path[0] == os.getcwd()  # modules are found relative to the working directory, as uvicorn does
    for bad in [f"{__name__}:SHARED", f"{__name__}:SCRIPT.answer", "no_such_module_x:f", f"{__name__}:nope", "x"]:
        with pytest.raises(argparse.ArgumentTypeError):
            http_cli.load_factory(bad)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The servers ``serve`` would run (not run), and the level of ``strands_py.http`` restored afterwards."""
    servers: list[Any] = []
    monkeypatch.setattr(http_cli._AnnouncingServer, "run", lambda server: servers.append(server))
    logger = logging.getLogger("strands_py.http")
    level = logger.level
    try:
        yield servers
    finally:
        logger.setLevel(level)


def test_serve_builds_the_app_runs_it_and_closes_the_store(
    served: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = mock.MagicMock(spec=DynamoDBIdempotencyStore)
    monkeypatch.setattr(http_cli, "store_from_url", lambda url: store)
    assert cli.main(["serve", "--agent", f"{__name__}:make_agent_for", "--port", "0", "--store", "x"]) == 0
    (server,) = served
    assert isinstance(server.config.app, AgentApp) and server.config.port == 0 and server.config.host == "127.0.0.1"
    assert server.config.access_log is False
    store.close.assert_called_once()
    # Neither a scope function nor --single-tenant: keys per caller, and serve says so.
    assert server.config.app._service.scopes.single_tenant is False
    assert any("single_tenant=True" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "keys are scoped per caller" in capsys.readouterr().out
    assert logging.getLogger("strands_py.http").level == logging.INFO  # one line per invocation


def test_serve_single_tenant_and_the_demo_agent_say_so(
    served: list[Any], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--agent", f"{__name__}:make_agent_for", "--single-tenant"]) == 0
    assert cli.main(["serve", "--log-level", "warning"]) == 0
    assert [server.config.app._service.scopes.single_tenant for server in served] == [True, True]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    out = capsys.readouterr().out
    assert "demo agent, single-tenant" in out and "scoped per caller" not in out
    assert logging.getLogger("strands_py.http").level == logging.WARNING


def test_ctrl_c_is_one_line_and_status_130_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(server: Any) -> None:
        raise KeyboardInterrupt

    store = mock.MagicMock(spec=DynamoDBIdempotencyStore)
    monkeypatch.setattr(http_cli, "store_from_url", lambda url: store)
    monkeypatch.setattr(http_cli._AnnouncingServer, "run", interrupted)
    assert cli.main(["serve", "--store", "x", "--log-level", "warning"]) == 130
    assert capsys.readouterr().err == "strands-py: stopped (interrupted)\n"
    store.close.assert_called_once()
    monkeypatch.setattr(cli, "_demo", lambda *args: interrupted(None))
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_serve_without_the_http_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "strands_py.http", None)
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve"])
    assert exited.value.code == 2
    assert "strands-py[http]" in capsys.readouterr().err
