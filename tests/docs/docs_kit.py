"""How the examples of README.md and docs/ are run: sybil parses the pages, these evaluators run their blocks.

- ``python`` blocks run in order, in one namespace per page, so a page reads (and runs) top to bottom. A block with
  a top-level ``await`` runs on the page's event loop, as in ``python -m asyncio``; other blocks run as a script.
  What a block prints is checked against its ``#>`` comments, where it has some.
- ``console`` blocks are shell sessions: each ``$ command`` (``\\`` continues it on the next line) runs in bash, and
  what follows it up to the next ``$`` is its expected output, compared as doctest does with ``ELLIPSIS`` and
  ``NORMALIZE_WHITESPACE`` (``...`` stands for anything). The commands of one block share one shell. A block that
  talks to ``localhost:8080`` gets a real ``python -m strands_py serve`` started for its page on a free port of
  127.0.0.1, and the address is rewritten to that port; nothing else in the command is changed.
- Every page runs under moto's ``mock_aws`` with dummy credentials (boto3 reaches no AWS), and a page that names
  ``REDIS_URL`` gets a ``redis-server`` of its own on a free port, its URL in ``REDIS_URL``.

Every other language is listed in ``NOT_RUN`` with the reason it is not run; a block in a language that is in
neither set fails the suite, so nothing new is left unchecked by accident.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import inspect
import io
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sybil import Document, Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

RUN = ("python", "console")
NOT_RUN = {
    "bash": "installation and development commands (pip, pipx, git, hatch, aws); CI runs their equivalents itself",
    "yaml": "the CloudFormation table: tests/docs/test_examples.py compares it with create_table()'s table",
    "javascript": "the browser client; the page `serve` shows implements it and runs in Chromium in "
    "integ_tests/test_http_browser.py",
    "text": "program output and formats, not commands",
}

SERVER_ADDRESS = "localhost:8080"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 90.0
_MARK = "\x1e"


class PageRun:
    """What one page's examples share: a namespace (sybil's), an event loop, and servers started on demand."""

    current: PageRun | None = None

    def __init__(self, document: Document, cwd: Path) -> None:
        self.document = document
        self.cwd = cwd
        self.loop = asyncio.new_event_loop()
        self.server_url: str | None = None
        self._server: subprocess.Popen[str] | None = None
        self._server_output: list[str] = []

    def __enter__(self) -> PageRun:
        PageRun.current = self
        return self

    def __exit__(self, *_: object) -> None:
        PageRun.current = None
        try:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            self._stop_server()

    # -- the HTTP server the console blocks talk to ----------------------------------------------------------

    def server(self) -> str:
        """The address (``127.0.0.1:PORT``) of this page's ``python -m strands_py serve``, started on first use."""
        if self.server_url is None:
            self.server_url = self._start_server()
        return self.server_url

    def _start_server(self) -> str:
        process = subprocess.Popen(
            [sys.executable, "-m", "strands_py", "serve", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
        )
        self._server = process
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:  # reads to the end, so the pipe never fills; None marks the end
            assert process.stdout is not None
            for line in process.stdout:
                self._server_output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, name="docs-serve-output", daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(f"serve did not start: {''.join(self._server_output)}") from None
            if line is None:
                raise RuntimeError(f"serve exited: {''.join(self._server_output)}")
            found = re.search(r"serving on http://(127\.0\.0\.1:\d+)", line)
            if found:
                return found.group(1)

    def _stop_server(self) -> None:
        process = self._server
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # the server's draining shutdown
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def evaluate_python(example: Example) -> None:
    """Run a python block in the page's namespace; top-level ``await`` runs on the page's loop.

    What the block prints is compared with its ``#>`` comments (``print(x)  #> expected``, one line of output
    each, in order, ``...`` standing for anything), when it has any.
    """
    __tracebackhide__ = True
    source = "\n" * (example.line + example.parsed.line_offset) + example.parsed
    code = compile(source, example.path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if code.co_flags & inspect.CO_COROUTINE:
            run = PageRun.current
            assert run is not None, "python blocks run inside a PageRun"
            run.loop.run_until_complete(eval(code, example.namespace))
        else:
            exec(code, example.namespace)
    want = [match.group(1) for match in re.finditer(r"#> ?(.*)$", str(example.parsed), re.MULTILINE)]
    if want and not doctest.OutputChecker().check_output(
        "\n".join(want) + "\n", printed.getvalue(), doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    ):
        raise AssertionError(
            f"{example.path}, line {example.line}: printed\n{printed.getvalue()}\nexpected (#>)\n" + "\n".join(want)
        )


def parse_session(text: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of a console block (``$ `` prompts, ``\\`` continuations)."""
    steps: list[tuple[str, str]] = []
    command: list[str] | None = None
    output: list[str] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            assert command is not None
            command.append(line)
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            if command is not None:
                steps.append(("\n".join(command), "\n".join(output)))
            command, output = [line[2:]], []
            continuing = line.endswith("\\")
        elif command is None:
            raise ValueError(f"a console block starts with a `$ ` command, not {line!r}")
        else:
            output.append(line)
    if command is not None:
        steps.append(("\n".join(command), "\n".join(output)))
    return steps


def evaluate_console(example: Example) -> None:
    """Run a console block's commands in one bash and compare each command's output with the page's."""
    __tracebackhide__ = True
    run = PageRun.current
    assert run is not None, "console blocks run inside a PageRun"
    steps = parse_session(example.parsed)
    if "curl " in example.parsed:
        require_program("curl", "curl")
    script = ["set -o pipefail"]
    for index, (command, _) in enumerate(steps):
        if SERVER_ADDRESS in command:
            command = command.replace(SERVER_ADDRESS, run.server())
        script += [f"printf '{_MARK}{index}\\n'", command]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(
        ["bash", "-e", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        cwd=run.cwd,
        env=env,
        timeout=COMMAND_TIMEOUT,
    )
    outputs = re.split(rf"{_MARK}\d+\n", done.stdout)[1:]
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for index, (command, want) in enumerate(steps):
        got = outputs[index] if index < len(outputs) else ""
        if not checker.check_output(want.strip() + "\n", got.strip() + "\n", flags):
            raise AssertionError(
                f"{example.path}, line {example.line}: `$ {command}` printed\n{got}\nexpected\n{want}\n"
                f"stderr:\n{done.stderr}"
            )
    if done.returncode != 0:
        raise AssertionError(f"{example.path}, line {example.line}: exit {done.returncode}\nstderr:\n{done.stderr}")


SYBIL = Sybil(
    parsers=[
        CodeBlockParser(language="python", evaluator=evaluate_python),
        CodeBlockParser(language="console", evaluator=evaluate_console),
        SkipParser(),
    ],
    path=str(ROOT),
)


def parse(page: Path) -> Document:
    """The page as sybil reads it."""
    return SYBIL.parse(page)


def fenced_blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, language, source)`` of every fenced code block of a page (sybil's view aside: the raw text)."""
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[index])
        if opening is None:
            index += 1
            continue
        fence, language, start = opening.group(2), opening.group(3), index
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        blocks.append((start + 1, language, "\n".join(body)))
        index += 1
    return blocks


def require_program(program: str, package: str) -> None:
    """Skip the page when ``program`` is not installed; on CI (``CI=true``) fail instead, naming the package."""
    if shutil.which(program) is not None:
        return
    message = f"{program} is not installed (apt-get install {package})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A ``redis-server`` on a free port of 127.0.0.1 without persistence; its URL. Skips (fails on CI) without one."""
    require_program("redis-server", "redis-server")
    binary = shutil.which("redis-server")
    assert binary is not None

    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--logfile", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = threading.Event()
    log: list[str] = []

    def drain() -> None:  # reads the log to the end (the pipe never fills) and tells when the server is ready
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # exited: the wait below ends, and the check after it says why

    threading.Thread(target=drain, name="docs-redis-log", daemon=True).start()
    try:
        if not ready.wait(START_TIMEOUT) or process.poll() is not None:
            raise RuntimeError(f"redis-server did not start: {''.join(log[-20:])}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
